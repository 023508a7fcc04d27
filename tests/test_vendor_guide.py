"""The docs that vendors copy from stay true to the code.

- The non-torch skeleton in docs/vendor-guide.md is exactly what
  ``llm-core new-backend acme --host-arrays`` writes: each block marked
  ``<!-- new-backend acme --host-arrays: PATH -->`` must equal that file. After changing the
  templates, rewrite the blocks with ``python tests/test_vendor_guide.py``.
- The guide and docs/hal.md name the current HAL API version.
- docs/hal.md lists every operator and every public method of ``llm_hal.Backend``, and the
  REQUIRED / INHERITED / OPTIONAL word of each method's docstring agrees with its table.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from llm_core.commands.new_backend import Plan, render
from llm_hal import HAL_API_VERSION, OPS, Backend

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "vendor-guide.md"
HAL_DOC = ROOT / "docs" / "hal.md"
GUIDE_NAME = "acme"  # the backend name the guide's skeleton is generated for
BLOCK = re.compile(
    r"<!-- new-backend (?P<name>\w+) --host-arrays: (?P<path>\S+) -->\n"
    r"```(?P<lang>\w*)\n(?P<code>.*?)```\n",
    re.DOTALL,
)


def _generated() -> dict[str, str]:
    return render(Plan.host_arrays(GUIDE_NAME))


def _blocks(text: str) -> list[re.Match[str]]:
    return list(BLOCK.finditer(text))


def sync_guide() -> None:
    """Rewrite the guide's generated blocks from the templates."""
    files = _generated()

    def replace(m: re.Match[str]) -> str:
        marker = f"<!-- new-backend {m['name']} --host-arrays: {m['path']} -->"
        return f"{marker}\n```{m['lang']}\n{files[m['path']]}```\n"

    GUIDE.write_text(BLOCK.sub(replace, GUIDE.read_text()))


def test_the_guide_shows_the_generated_skeleton() -> None:
    blocks = _blocks(GUIDE.read_text())
    paths = [m["path"] for m in blocks]
    assert {"pyproject.toml", "src/llm_core_acme/plugin.py", "src/llm_core_acme/backend.py"} <= set(
        paths
    ), paths
    files = _generated()
    stale = [
        m["path"] for m in blocks if m["name"] != GUIDE_NAME or files.get(m["path"]) != m["code"]
    ]
    assert not stale, (
        f"docs/vendor-guide.md shows an outdated {', '.join(stale)}: "
        "run `python tests/test_vendor_guide.py` to rewrite its blocks from the templates"
    )


@pytest.mark.parametrize("doc", [GUIDE, HAL_DOC], ids=lambda p: p.name)
def test_docs_name_the_current_hal_version(doc: Path) -> None:
    assert f"HAL API {HAL_API_VERSION}" in doc.read_text()


def _hal_rows() -> dict[str, str]:
    """First column (the name, before its signature) -> the whole row, of docs/hal.md's tables."""
    rows: dict[str, str] = {}
    for line in HAL_DOC.read_text().splitlines():
        m = re.match(r"\| `(\w+)", line)
        if m:
            rows.setdefault(m[1], line)
    return rows


def test_hal_doc_lists_every_operator_and_method() -> None:
    rows = _hal_rows()
    public = [n for n in vars(Backend) if not n.startswith("_") and callable(getattr(Backend, n))]
    missing = [n for n in (*OPS, *public) if n not in rows]
    assert not missing, f"docs/hal.md has no row for {missing}"


KINDS = ("REQUIRED", "INHERITED", "OPTIONAL")
#: Methods a backend may implement (``shape`` and ``native_ops`` are never overridden).
METHODS = [
    name
    for name, member in vars(Backend).items()
    if not name.startswith("_") and callable(member) and name not in ("shape", "native_ops")
]


@pytest.mark.parametrize("method", METHODS)
def test_docstring_and_hal_doc_agree_on_who_implements(method: str) -> None:
    said = [k for k in KINDS if k in (getattr(Backend, method).__doc__ or "")]
    if method in OPS:
        assert said == ["INHERITED"], f"Backend.{method}: {said}"
    else:
        row = _hal_rows()[method]
        assert len(said) == 1 and said[0] in row, f"Backend.{method}: {said} vs {row}"


if __name__ == "__main__":
    sync_guide()
    print(f"rewrote the generated blocks of {GUIDE.relative_to(ROOT)}", file=sys.stderr)
