"""The reports of ``llm-core conformance diff``: a terminal summary, the JSON record and a
self-contained HTML page with the per-layer error curves (inline SVG, no plotting library)."""

from __future__ import annotations

import html
import json
import math
import pathlib
from typing import Any

#: Where a zero error (bit-identical) is drawn on the log scale.
_FLOOR = 1e-18
_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
)  # fmt: skip


def console(record: dict[str, Any]) -> str:
    """The terminal summary of a diff record."""
    model, cand, other = record["model"], record["candidate"], record["against"]
    lines = [
        f"llm-core conformance diff: {model['name']} ({model['kind']}) in {record['dtype']}, "
        f"{len(record['prompt_token_ids'])} prompt tokens, {record['max_tokens']} new tokens",
        f"  candidate: {_who(cand)}",
        f"  against:   {_who(other)}",
        f"  reference: {record['reference']}",
        "  tokens:    " + _tokens_line(record["tokens"]),
        "  calls:     " + _streams_line(record["streams"]),
    ]
    for error in record["verdict"]["errors"]:
        lines.append(f"  raised:    {error}")
    first = record["first_divergence"]
    if first is None:
        lines.append(f"NO DIVERGENCE: {record['verdict']['summary']}")
    else:
        lines += _divergence_lines(first, cand["backend"], other["backend"])
    lines.append("per operator, the largest NMSE against the reference on equal inputs:")
    layers = record["layers"]
    for op, row in layers["equal_inputs_nmse"].items():
        place, value = max(row.items(), key=lambda kv: _num(kv[1]))
        failed = layers["failed"].get(op)
        verdict = f"  FAILED in {', '.join(failed)}" if failed else ""
        lines.append(f"  {op:<24} {_num(value):9.2e} ({place}){verdict}")
    return "\n".join(lines)


def _who(side: dict[str, Any]) -> str:
    device = side.get("device", {})
    name = device.get("name") if isinstance(device, dict) else None
    text = f"{side['backend']} in {side['dtype']}" + (f" on {name}" if name else "")
    return text + (f" (failed: {side['error']})" if side.get("error") else "")


def _tokens_line(tokens: dict[str, Any]) -> str:
    first = tokens["first_difference"]
    if first is None:
        return f"identical {tokens['candidate']}"
    return (
        f"first difference at generated token {first['index']} (position {first['position']}): "
        f"{first['candidate']} {first['candidate_text']!r} vs {first['against']} "
        f"{first['against_text']!r}"
    )


def _streams_line(streams: dict[str, Any]) -> str:
    text = (
        f"{streams['candidate_calls']} candidate, {streams['against_calls']} against, "
        f"{streams['aligned']} aligned"
    )
    bits = streams["first_bitwise_difference"]
    if bits is None:
        return text + "; the aligned outputs are bit-identical"
    text += f"; first bitwise difference at call {bits['call']} {bits['op']} ({bits['where']})"
    drift = streams["first_drift_beyond_tolerance"]
    if drift is not None:
        text += (
            f"; their drift first exceeds an op's NMSE cap at call {drift['call']} "
            f"{drift['op']} ({drift['where']}, step {drift['step']}: upstream error included, "
            "not a verdict)"
        )
    return text


def _divergence_lines(first: dict[str, Any], cand: str, other: str) -> list[str]:
    position = first["token_position"]
    lines = [
        f"DIVERGENCE: {first['op']} in {first['where']}, {first['phase']} (call {first['call']})"
        + (f", token position {position}" if position is not None else ""),
    ]
    for label, key in ((cand, "vs_reference"), (other, "against_vs_reference")):
        c = first.get(key)
        if c is None:
            continue
        verdict = "ok" if c["passed"] else "FAILED"
        lines.append(
            f"  {label} vs reference, equal inputs: {verdict}: NMSE {_num(c['nmse']):.3g}, "
            f"max abs {_num(c['max_abs']):.3g}, max rel {_num(c['max_rel']):.3g} "
            f"[{c['tolerance']}]"
        )
        lines += [f"    - {f}" for f in c.get("failures", [])]
    pair = first.get("vs_against")
    if pair:
        lines.append(
            f"  {cand} vs {other}, equal inputs: NMSE {_num(pair['nmse']):.3g}, "
            f"max abs {_num(pair['max_abs']):.3g}"
        )
    lines.append(f"  => {first['wrong_backend']} is wrong")
    return lines


def _num(value: Any) -> float:
    """A metric of the record (infinities are written as strings in JSON)."""
    return float(value)


# -- HTML ------------------------------------------------------------------------------------


def to_html(record: dict[str, Any]) -> str:
    """A self-contained page: verdict, the diverging call, tokens, and per-layer plots."""
    layers = record["layers"]
    verdict = record["verdict"]
    first = record["first_divergence"]
    model = record["model"]
    title = (
        f"diff {model['name']}: {record['candidate']['backend']} vs {record['against']['backend']}"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(model['architecture'])} ({_e(model['kind'])}) in {_e(record['dtype'])}, "
        f"{len(record['prompt_token_ids'])} prompt tokens, {record['max_tokens']} new tokens, "
        f"seed {record['seed']}. Reference: {_e(record['reference'])}.</p>",
        f"<p class='{'bad' if verdict['diverged'] else 'good'}'>{_e(verdict['summary'])}</p>",
    ]
    if first is not None:
        parts.append(_divergence_table(first, record))
    parts.append("<h2>Generated tokens</h2><p>" + _e(_tokens_line(record["tokens"])) + "</p>")
    parts.append("<h2>Call streams</h2><p>" + _e(_streams_line(record["streams"])) + "</p>")
    parts.append("<h2>Error per layer, equal inputs</h2>")
    parts.append(
        "<p>For each operator, the largest NMSE of the candidate's output against the float64 "
        "reference given the candidate's own inputs, per place in the model (any step). Red "
        "rings: calls beyond the operator's tolerance.</p>"
    )
    parts.append(_plot(layers["places"], layers["equal_inputs_nmse"], layers["failed"]))
    parts.append("<h2>Drift between the streams</h2>")
    parts.append(
        "<p>For each operator, the largest estimated NMSE of the candidate's output against the "
        "same call on the other side (each side with its own inputs): how far apart the two runs "
        "are, errors from upstream included.</p>"
    )
    parts.append(_plot(layers["places"], layers["drift_nmse"], {}))
    parts.append(_table(layers))
    parts.append(
        "<h2>Environment</h2><pre>" + _e(json.dumps(record["environment"], indent=1)) + "</pre>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _divergence_table(first: dict[str, Any], record: dict[str, Any]) -> str:
    rows = [
        ("operator", first["op"]),
        ("where", f"{first['where']} ({first['phase']}, call {first['call']})"),
        ("token position", first["token_position"]),
        ("wrong side", first["wrong_backend"]),
    ]
    for label, key in (
        (record["candidate"]["backend"], "vs_reference"),
        (record["against"]["backend"], "against_vs_reference"),
    ):
        c = first.get(key)
        if c is not None:
            rows.append(
                (
                    f"{label} vs reference",
                    f"{'ok' if c['passed'] else 'FAILED'}: NMSE {_num(c['nmse']):.3g}, max abs "
                    f"{_num(c['max_abs']):.3g}, max rel {_num(c['max_rel']):.3g}; "
                    + "; ".join(c.get("failures", [])),
                )
            )
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<h2>First divergence</h2><table>{body}</table>"


def _table(layers: dict[str, Any]) -> str:
    places = layers["places"]
    head = "".join(f"<th>{_e(p)}</th>" for p in places)
    rows = []
    for op, row in layers["equal_inputs_nmse"].items():
        failed = set(layers["failed"].get(op, []))
        cells = "".join(
            f"<td class='{'bad' if p in failed else ''}'>"
            + (f"{_num(row[p]):.1e}" if p in row else "")
            + "</td>"
            for p in places
        )
        rows.append(f"<tr><th>{_e(op)}</th>{cells}</tr>")
    return f"<h2>NMSE on equal inputs</h2><table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _plot(
    places: list[str], series: dict[str, dict[str, Any]], failed: dict[str, list[str]]
) -> str:
    """Log-scale NMSE per place, one polyline per operator, in inline SVG."""
    width, height, left, right, top, bottom = 860, 340, 70, 190, 20, 80
    values = [_num(v) for row in series.values() for v in row.values()]
    positive = [v for v in values if 0 < v < math.inf]
    low = math.floor(math.log10(min(positive))) - 1 if positive else -16
    high = math.ceil(math.log10(max(positive))) if positive else 0
    low, high = max(low, round(math.log10(_FLOOR))), max(high, low + 1)
    span_x = max(len(places) - 1, 1)

    def x(i: int) -> float:
        return left + (width - left - right) * i / span_x

    zero_y = height - bottom  # bit-identical outputs: a row of their own under the decades
    decades = height - bottom - 24 - top

    def y(value: float) -> float:
        if value <= 0:
            return zero_y
        v = math.log10(min(max(value, 10.0**low), 10.0**high)) if value < math.inf else high
        return top + decades * (high - v) / (high - low)

    out = [f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>"]
    ticks = [(y(10.0**exp), f"1e{exp}") for exp in range(low, high + 1)] + [(zero_y, "0")]
    for at, label in ticks:
        out.append(
            f"<line x1='{left}' x2='{width - right}' y1='{at:.1f}' y2='{at:.1f}' "
            f"stroke='#eee'/><text x='{left - 6}' y='{at + 4:.1f}' text-anchor='end' "
            f"font-size='10'>{label}</text>"
        )
    for i, place in enumerate(places):
        out.append(
            f"<text x='{x(i):.1f}' y='{height - bottom + 14}' font-size='10' text-anchor='end' "
            f"transform='rotate(-45 {x(i):.1f} {height - bottom + 14})'>{_e(place)}</text>"
        )
    for n, (op, row) in enumerate(series.items()):
        color = _COLORS[n % len(_COLORS)]
        points = [(i, _num(row[p])) for i, p in enumerate(places) if p in row]
        if not points:
            continue
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in points)
        out.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.5'/>")
        for i, v in points:
            bad = places[i] in failed.get(op, [])
            out.append(
                f"<circle cx='{x(i):.1f}' cy='{y(v):.1f}' r='{6 if bad else 2.5}' "
                f"fill='{'none' if bad else color}' stroke='{'#d00' if bad else color}' "
                f"stroke-width='{2 if bad else 1}'><title>{_e(op)} at {_e(places[i])}: "
                f"{v:.3g}</title></circle>"
            )
        ly = top + 14 * n + 8
        out.append(
            f"<line x1='{width - right + 10}' x2='{width - right + 28}' y1='{ly}' y2='{ly}' "
            f"stroke='{color}' stroke-width='2'/><text x='{width - right + 32}' y='{ly + 4}' "
            f"font-size='11'>{_e(op)}</text>"
        )
    out.append(
        f"<text x='14' y='{top + (height - top - bottom) / 2:.0f}' font-size='11' "
        f"transform='rotate(-90 14 {top + (height - top - bottom) / 2:.0f})' "
        "text-anchor='middle'>NMSE</text></svg>"
    )
    return "".join(out)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
.good { color: #176e17; font-weight: bold; }
.bad { color: #b00; font-weight: bold; }
pre { background: #f6f6f6; padding: 1em; font-size: 12px; overflow-x: auto; }
"""


def write(
    record: dict[str, Any], directory: str | pathlib.Path, name: str = "diff"
) -> list[pathlib.Path]:
    """Write ``NAME.json`` and ``NAME.html`` into ``directory``."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    json_path, html_path = path / f"{name}.json", path / f"{name}.html"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    html_path.write_text(to_html(record))
    return [json_path, html_path]
