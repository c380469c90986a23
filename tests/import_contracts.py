"""A custom import-linter contract: forbidden names inside an external package.

import-linter's own ``forbidden`` contract takes external packages only whole
(``absl``), but keras-defense's library modules may use ``absl.logging`` and
must not use ``absl.flags`` or ``absl.app`` (only ``flags/`` and ``bin/``
read flags; library code takes config dataclasses). This contract reads the
import lines grimp records for each source module's imports of the external
package and fails on the forbidden submodules. ``.importlinter`` registers it
(``contract_types``); ``lint-imports`` finds it because it puts the working
directory on ``sys.path``.
"""

from __future__ import annotations

import re

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract
from importlinter.domain.contract import ContractCheck


class ForbiddenSubmodulesContract(Contract):
  """Source modules (and their descendants) never import the listed external submodules.

  Configuration options:
    source_modules: packages whose modules are checked.
    forbidden_submodules: dotted names inside an external package, e.g. absl.flags.
    exempt_modules: modules allowed the import anyway (optional; give the reason
      in the contract's comment).
  """

  type_name = "forbidden_submodules"

  source_modules = fields.ListField(subfield=fields.ModuleField())
  forbidden_submodules = fields.ListField(subfield=fields.StringField())
  exempt_modules = fields.ListField(subfield=fields.ModuleField(), required=False, default=[])

  def check(self, graph, verbose: bool) -> ContractCheck:
    del verbose
    violations = []
    for forbidden in self.forbidden_submodules:
      package, _, name = forbidden.partition(".")
      # "from absl import flags", "from absl.flags import X", "import absl.flags"
      pattern = re.compile(
          rf"^\s*(from\s+{package}\s+import\s+.*\b{name}\b"
          rf"|from\s+{package}\.{name}\b|import\s+{package}\.{name}\b)")
      for source in self.source_modules:
        modules = {source.name} | graph.find_descendants(source.name)
        exempt = {m.name for m in self.exempt_modules}
        for module in sorted(modules - exempt):
          if package not in graph.find_modules_directly_imported_by(module):
            continue
          for detail in graph.get_import_details(importer=module, imported=package):
            if pattern.match(detail["line_contents"]):
              violations.append((module, detail["line_number"], detail["line_contents"],
                                 forbidden))
    return ContractCheck(kept=not violations, metadata={"violations": violations})

  def render_broken_contract(self, check: ContractCheck) -> None:
    for module, line, contents, forbidden in check.metadata["violations"]:
      output.print_error(f"{module} (l.{line}) imports {forbidden}: {contents.strip()}",
                         bold=False)
      output.new_line()
