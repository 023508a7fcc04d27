"""Reports rendered from a certificate: Markdown, self-contained HTML, JUnit XML, and the short
console summary. They read only the certificate, so any certificate can be re-rendered."""

from __future__ import annotations

import html
import pathlib
import xml.etree.ElementTree as ET
from typing import Any

_MARK = {
    "CERTIFIED": "✅",
    "FAILED": "❌",
    "UNSUPPORTED": "🟧",
    "NOT RUN": "⬜",
    "passed": "✅",
    "failed": "❌",
    "unsupported": "🟧",
}
_COLOR = {
    "CERTIFIED": "#1a7f37",
    "FAILED": "#cf222e",
    "UNSUPPORTED": "#bc4c00",
    "NOT RUN": "#6e7781",
    "passed": "#1a7f37",
    "failed": "#cf222e",
    "unsupported": "#bc4c00",
}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _columns(cert: dict[str, Any]) -> list[tuple[str, str]]:
    """(backend, dtype) matrix columns, in request order."""
    return [(b["name"], d) for b in cert["backends"] for d in b["dtypes"]]


def _op_columns(cert: dict[str, Any]) -> list[tuple[str, str]]:
    """(backend, dtype) columns of the operator table: every dtype an operator ran in."""
    order = ["float32", "bfloat16", "float16", "float64"]
    cols = []
    for b in cert["backends"]:
        dtypes = {o["dtype"] for o in b.get("ops", [])}
        cols += [(b["name"], d) for d in sorted(dtypes, key=order.index)]
    return cols


def _rows(cert: dict[str, Any]) -> list[str]:
    rows: list[str] = []
    for cell in cert["cells"]:
        if cell["model"] not in rows:
            rows.append(cell["model"])
    return rows


def _cell_index(cert: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(c["model"], c["backend"], c["dtype"]): c for c in cert["cells"]}


def _header(cert: dict[str, Any]) -> list[str]:
    env = cert["environment"]
    git = env.get("git", {})
    commit = git.get("commit", "unknown")
    commit = commit[:12] + (" (with uncommitted changes)" if git.get("dirty") else "")
    pk = env["packages"]
    return [
        f"Suite {cert['suite_version']}, HAL API {cert['hal_api_version']}, llm-core "
        f"{pk['llm-core']}, torch {pk['torch']}, transformers {pk['transformers']}, "
        f"Python {env['python']}, commit {commit}.",
        f"Created {cert['created']} in {cert['seconds']} s, seed {cert['seeds']['seed']}"
        + (", quick mode (not a certification)" if cert["request"]["quick"] else "")
        + f". Certificate digest sha256:{cert['integrity']['digest']['value'][:16]}...",
    ]


def _summary_line(cert: dict[str, Any]) -> str:
    s = cert["summary"]
    return (
        f"{s['CERTIFIED']} certified, {s['FAILED']} failed, {s['UNSUPPORTED']} unsupported, "
        f"{s['NOT RUN']} not run; {s['failed_ops']} operator(s) failed; exit status "
        f"{s['exit_status']}"
    )


def _failures(cert: dict[str, Any]) -> list[dict[str, Any]]:
    """Every failed operator case and cell, with the command that replays it."""
    out = []
    for backend in cert["backends"]:
        for op in backend.get("ops", []):
            for case in op["cases"]:
                if case["status"] == "failed":
                    out.append(
                        {
                            "what": f"{backend['name']} · {op['op']} · {op['dtype']} · "
                            f"case {case['case']}",
                            "detail": "; ".join(case.get("failures", [])) or case.get("error", ""),
                            "params": case["params"],
                            "replay": case["replay"],
                        }
                    )
    for cell in cert["cells"]:
        if cell["status"] in ("FAILED", "UNSUPPORTED"):
            out.append(
                {
                    "what": f"{cell['model']} × {cell['backend']} × {cell['dtype']}: "
                    f"{cell['status']}",
                    "detail": "; ".join(cell["reasons"]),
                    "params": "",
                    "replay": cell["replay"],
                }
            )
    return out


_BACKEND_HEAD = ["backend", "ran", "version", "device", "driver", "reason"]


def _backend_rows(cert: dict[str, Any]) -> list[list[str]]:
    rows = []
    for b in cert["backends"]:
        device = b.get("device", {})
        probed = b.get("probe_devices") or [{}]
        rows.append(
            [
                b["name"],
                b["status"],
                b.get("version", "?"),
                probed[0].get("name") or device.get("name", "-"),
                device.get("driver", "-"),
                b.get("reason", ""),
            ]
        )
    return rows


_WAIVER_HEAD = ["name", "backend", "op class", "op", "dtype", "tolerance", "reason"]


def _waiver_rows(cert: dict[str, Any]) -> list[list[str]]:
    return [
        [
            w["name"],
            w["backend"],
            w["op_class"],
            w["op"] or "all",
            w["dtype"] or "all",
            w["tolerance"],
            w["reason"],
        ]
        for w in cert["waivers"]
    ]


_TOLERANCE_HEAD = ["class", "fp32", "fp16", "bf16"]


def _tolerance_rows(cert: dict[str, Any]) -> list[list[str]]:
    return [[k, v["float32"], v["float16"], v["bfloat16"]] for k, v in cert["tolerances"].items()]


def _column_head(first: str, cols: list[tuple[str, str]]) -> list[str]:
    """A table head: ``first``, then one "backend dtype" column per (backend, dtype)."""
    return [first] + [f"{b} {_SHORT.get(d, d)}" for b, d in cols]


def _op_index(cert: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every operator result, by (backend, op, dtype)."""
    return {(b["name"], o["op"], o["dtype"]): o for b in cert["backends"] for o in b.get("ops", [])}


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _model_rows(cert: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in cert["cells"]:
        m, n, g = c.get("metrics") or {}, c.get("reference_noise") or {}, c.get("greedy") or {}
        if not m:
            continue
        audits = c.get("audits") or {}
        audit_text = ", ".join(
            f"{name} {'ok' if a.get('passed') else 'FAILED'}" for name, a in audits.items()
        )
        rows.append(
            [
                c["model"],
                c["backend"],
                c["dtype"],
                f"{_MARK[c['status']]} {c['status']}",
                f"{_fmt(m['kld_mean'])} / {_fmt(m['kld_p999'])}",
                f"{m['top1_decisive']:.4f} ({m['top1_same']:.4f})",
                f"{m['cosine_mean']:.6f}",
                _fmt(m["logprob_diff_mean"]),
                f"{_fmt(n.get('kld_mean', float('nan')))} / {n.get('top1_same', float('nan')):.4f}",
                f"{g.get('exact_match', 0):.2f}",
                audit_text or "-",
            ]
        )
    return rows


_MODEL_HEAD = [
    "model",
    "backend",
    "dtype",
    "status",
    "KLD mean / p99.9",
    "top-1 (raw)",
    "cosine",
    "top-5 |Δlogprob|",
    "reference noise KLD / top-1",
    "greedy exact",
    "audits",
]


# -------------------------------------------------------------------------------------------
# Markdown
# -------------------------------------------------------------------------------------------


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def markdown(cert: dict[str, Any]) -> str:
    cells = _cell_index(cert)
    cols = _columns(cert)
    lines = ["# llm-core conformance: model × backend support matrix", ""]
    lines += [*_header(cert), "", f"**{_summary_line(cert)}**", ""]
    lines += ["## Matrix", ""]
    head = _column_head("model", cols)
    rows = []
    for model in _rows(cert):
        row = [model]
        for b, d in cols:
            cell = cells.get((model, b, d))
            row.append(f"{_MARK[cell['status']]} {cell['status']}" if cell else "")
        rows.append(row)
    lines += _md_table(head, rows)
    lines += [
        "",
        "✅ CERTIFIED · ❌ FAILED · 🟧 UNSUPPORTED (the backend lacks an operator the "
        "model needs, or the model refuses the dtype) · ⬜ NOT RUN (see the reason below)",
        "",
    ]
    lines += ["## Backends", ""]
    lines += _md_table(_BACKEND_HEAD, _backend_rows(cert))
    lines += ["", "## Waivers", ""]
    if cert["waivers"]:
        lines += _md_table(_WAIVER_HEAD, _waiver_rows(cert))
    else:
        lines.append("None: every result below is held to the global tolerance table.")
    lines += [
        "",
        "## Model level",
        "",
        "Against Hugging Face transformers in float32 on the same weights; the reference "
        "noise is transformers in the cell's dtype (float64 for float32 cells) against "
        "the same float32 reference. Top-1 counts near-ties (within the dtype's "
        "tie margin) as agreement; the raw rate is in parentheses.",
        "",
    ]
    lines += _md_table(_MODEL_HEAD, _model_rows(cert))
    lines += ["", "## Operators", ""]
    op_cols = _op_columns(cert)
    op_index = _op_index(cert)
    rows = []
    for op in cert["mandatory"]["ops"]:
        row = [op]
        for b, d in op_cols:
            o = op_index.get((b, op, d))
            if o is None:
                row.append("")
                continue
            total = o["passed"] + o["failed"]
            row.append(
                f"{_MARK[o['status']]} {o['passed']}/{total}"
                if total
                else f"{_MARK[o['status']]} {o['status']}"
            )
        rows.append(row)
    lines += _md_table(_column_head("operator", op_cols), rows)
    lines += ["", "Cells give cases passed / run. Logits operators run in float32 only.", ""]
    failures = _failures(cert)
    lines += ["## Failures", ""]
    if not failures:
        lines += ["None.", ""]
    for f in failures:
        lines += [f"### {f['what']}", ""]
        if f["params"]:
            lines.append(f"Case: `{f['params']}`")
            lines.append("")
        lines += [f["detail"], "", "```", f["replay"], "```", ""]
    lines += ["## Tolerances (suite " + cert["suite_version"] + ")", ""]
    lines += _md_table(_TOLERANCE_HEAD, _tolerance_rows(cert))
    lines += [
        "",
        f"Sampling: total variation ≤ {cert['sampling']['tv_max']} over "
        f"{cert['sampling']['draws']} seeded draws. Model gates per dtype:",
        "",
    ]
    gate_keys = list(next(iter(cert["model_thresholds"].values())))
    lines += _md_table(
        ["dtype", *gate_keys],
        [[d, *(_fmt(t[k]) for k in gate_keys)] for d, t in cert["model_thresholds"].items()],
    )
    lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# HTML
# -------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#1f2328;
max-width:80rem}table{border-collapse:collapse;margin:.5rem 0 1.5rem}
td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;font-size:.9rem}
th{background:#f6f8fa}.s{color:#fff;font-weight:600;text-align:center}
code,pre{background:#f6f8fa;padding:.2rem .4rem;border-radius:4px}pre{padding:.6rem;overflow-x:auto}
.muted{color:#57606a}
"""


def _h(text: Any) -> str:
    return html.escape(str(text))


def _html_table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(c if raw else f"<td>{_h(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _status_td(status: str, text: str | None = None, title: str = "") -> str:
    color = _COLOR.get(status, "#6e7781")
    return f'<td class="s" style="background:{color}" title="{_h(title)}">{_h(text or status)}</td>'


def to_html(cert: dict[str, Any]) -> str:
    cells = _cell_index(cert)
    cols = _columns(cert)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>llm-core conformance</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>llm-core conformance: model × backend support matrix</h1>",
    ]
    parts += [f"<p class='muted'>{_h(line)}</p>" for line in _header(cert)]
    parts.append(f"<p><strong>{_h(_summary_line(cert))}</strong></p><h2>Matrix</h2>")
    rows = []
    for model in _rows(cert):
        row = [f"<td>{_h(model)}</td>"]
        for b, d in cols:
            cell = cells.get((model, b, d))
            if cell is None:
                row.append("<td></td>")
            else:
                row.append(_status_td(cell["status"], title="; ".join(cell["reasons"])))
        rows.append(row)
    parts.append(_html_table(_column_head("model", cols), rows, raw=True))
    parts.append("<h2>Backends</h2>")
    parts.append(_html_table(_BACKEND_HEAD, _backend_rows(cert)))
    parts.append("<h2>Waivers</h2>")
    if cert["waivers"]:
        parts.append(_html_table(_WAIVER_HEAD, _waiver_rows(cert)))
    else:
        parts.append("<p>None: every result is held to the global tolerance table.</p>")
    parts.append("<h2>Model level</h2>")
    parts.append(_html_table(_MODEL_HEAD, _model_rows(cert)))
    parts.append("<h2>Operators</h2>")
    op_index = _op_index(cert)
    op_cols = _op_columns(cert)
    rows = []
    for op in cert["mandatory"]["ops"]:
        row = [f"<td>{_h(op)}</td>"]
        for b, d in op_cols:
            o = op_index.get((b, op, d))
            if o is None:
                row.append("<td></td>")
            else:
                total = o["passed"] + o["failed"]
                row.append(
                    _status_td(o["status"], f"{o['passed']}/{total}" if total else o["status"])
                )
        rows.append(row)
    parts.append(_html_table(_column_head("operator", op_cols), rows, raw=True))
    parts.append("<h2>Failures</h2>")
    failures = _failures(cert)
    if not failures:
        parts.append("<p>None.</p>")
    for f in failures:
        parts.append(f"<h3>{_h(f['what'])}</h3>")
        if f["params"]:
            parts.append(f"<p>Case: <code>{_h(f['params'])}</code></p>")
        parts.append(f"<p>{_h(f['detail'])}</p><pre>{_h(f['replay'])}</pre>")
    parts.append(f"<h2>Tolerances (suite {_h(cert['suite_version'])})</h2>")
    parts.append(_html_table(_TOLERANCE_HEAD, _tolerance_rows(cert)))
    parts.append("</body></html>")
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------
# JUnit XML
# -------------------------------------------------------------------------------------------


def junit(cert: dict[str, Any]) -> str:
    """One test suite per backend: a test case per operator x dtype and per cell."""
    root = ET.Element("testsuites", name="llm-core conformance")
    for backend in cert["backends"]:
        suite = ET.SubElement(root, "testsuite", name=f"conformance.{backend['name']}")
        tests = failures = skipped = 0
        for op in backend.get("ops", []):
            tests += 1
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"ops.{backend['name']}",
                name=f"{op['op']}[{op['dtype']}]",
            )
            if op["status"] == "failed":
                failures += 1
                bad = [c for c in op["cases"] if c["status"] == "failed"]
                text = "\n".join(
                    f"case {c['case']} ({c['params']}): "
                    f"{'; '.join(c.get('failures', [])) or c.get('error', '')}\n  {c['replay']}"
                    for c in bad
                )
                ET.SubElement(case, "failure", message=f"{len(bad)} case(s) failed").text = text
            elif op["status"] == "unsupported":
                skipped += 1
                ET.SubElement(case, "skipped", message="declared unsupported (verified)")
        for cell in cert["cells"]:
            if cell["backend"] != backend["name"]:
                continue
            tests += 1
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"models.{backend['name']}",
                name=f"{cell['model']}[{cell['dtype']}]",
            )
            reasons = "; ".join(cell["reasons"])
            if cell["status"] == "NOT RUN":
                skipped += 1
                ET.SubElement(case, "skipped", message=reasons or "not run")
            elif cell["status"] != "CERTIFIED":
                failures += 1
                ET.SubElement(case, "failure", message=f"{cell['status']}: {reasons}").text = cell[
                    "replay"
                ]
        suite.set("tests", str(tests))
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# -------------------------------------------------------------------------------------------
# files and console
# -------------------------------------------------------------------------------------------


def write_reports(
    cert: dict[str, Any],
    directory: pathlib.Path,
    name: str = "conformance",
    junit_path: pathlib.Path | None = None,
) -> list[pathlib.Path]:
    """Write NAME.json, NAME.md, NAME.html and the JUnit XML; returns the paths."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        directory / f"{name}.json": json.dumps(cert, indent=2, ensure_ascii=False) + "\n",
        directory / f"{name}.md": markdown(cert),
        directory / f"{name}.html": to_html(cert),
        junit_path or directory / f"{name}-junit.xml": junit(cert),
    }
    for path, text in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return list(paths)


def console(cert: dict[str, Any]) -> str:
    """The matrix, waivers and every failure with its replay command, for a terminal."""
    cells = _cell_index(cert)
    cols = _columns(cert)
    width = max([len(m) for m in _rows(cert)] + [5])
    lines = [f"llm-core conformance, suite {cert['suite_version']}", ""]
    lines.append(" " * width + "  " + "  ".join(f"{b} {_SHORT.get(d, d):<11}" for b, d in cols))
    for model in _rows(cert):
        statuses = []
        for b, d in cols:
            cell = cells.get((model, b, d))
            text = cell["status"] if cell else ""
            statuses.append(f"{text:<{len(b) + 12}}")
        lines.append(f"{model:<{width}}  " + "  ".join(statuses))
    for backend in cert["backends"]:
        if backend["status"] != "ran":
            lines.append(f"\n{backend['name']}: NOT RUN: {backend['reason']}")
    waivers = cert["waivers"]
    lines.append(
        "\nwaivers: "
        + (
            ", ".join(f"{w['name']} ({w['backend']}: {w['reason']})" for w in waivers)
            if waivers
            else "none"
        )
    )
    for f in _failures(cert):
        head = "UNSUPPORTED" if f["what"].endswith(": UNSUPPORTED") else "FAILED"
        lines += ["", f"{head} {f['what'].removesuffix(': ' + head)}", f"  {f['detail'][:500]}"]
        lines += [f"  replay: {f['replay']}"]
    lines += ["", _summary_line(cert)]
    return "\n".join(lines)
