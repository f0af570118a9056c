"""Server-rendered HTML of the status page: pure functions from screener.http.status values to text.

Every value goes through `h` (HTML escaping). The pages use the one stylesheet (/static/style.css),
no script and no inline style, so that the Content-Security-Policy can forbid both.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import quote

from screener.http.auth import Principal
from screener.http.status import EngineFinding, Overview, StudyDetail, Throughput
from screener.store import Failure

SOP_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX (presentation)",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX (processing)",
}

# Messages shown after an action (keys from the redirect, never text from the request).
DONE_MESSAGES = {
    "resend": "Re-queued: the node sends it again on its next pass.",
    "resend-none": "Nothing to re-queue: the study has no failed send and is not failed.",
    "complete": "Marked complete: the node screens it on its next pass.",
    "complete-none": "Not changed: only a study that is still receiving can be completed.",
}


def h(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def css_token(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "", text.lower())


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    s = max(0.0, now - ts)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    d, rem = divmod(seconds, 86400)
    hh, rem = divmod(rem, 3600)
    mm, ss = divmod(rem, 60)
    if d:
        return f"{d} d {hh} h"
    if hh:
        return f"{hh} h {mm} min"
    if mm:
        return f"{mm} min"
    return f"{ss} s"


def state_badge(state: str) -> str:
    return f'<span class="state s-{css_token(state)}">{h(state)}</span>'


def study_link(uid: str) -> str:
    return f'<a class="uid" href="/studies/{quote(uid)}">{h(uid)}</a>'


def finding_spans(findings: Iterable[EngineFinding]) -> str:
    parts = []
    for f in findings:
        word = "present" if f.present else "absent"
        parts.append(
            f'<span class="finding {word}" title="highest probability over the study\'s images">'
            f"{h(f.engine)}: {word} ({f.probability:.2f})</span>"
        )
    return " ".join(parts) or '<span class="muted">-</span>'


def page(
    title: str, header: str, body: str, principal: Principal | None, auth_enabled: bool, refresh_s: int = 0
) -> str:
    """The whole document: top bar (`header` is trusted HTML built here), `body`, footer."""
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    if principal is not None:
        who = f"signed in as <b>{h(principal.name)}</b>"
    elif auth_enabled:
        who = '<a href="/login">sign in</a> for actions'
    else:
        who = "read-only"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{refresh}
<title>{h(title)}</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<header class="top"><span class="brand"><a href="/">cspine-screener</a></span>
{header}<span class="spacer"></span><span class="who">{who}</span></header>
{body}
<footer>
<p>Results of engines that are not validated are <b>NOT FOR DIAGNOSIS</b>. This page shows UIDs and states;
no patient name, ID or birth date.</p>
<p><a href="/metrics">/metrics</a><a href="/healthz">/healthz</a><a href="/readyz">/readyz</a></p>
</footer>
</body>
</html>
"""


def _node_line(o: Overview, now: float) -> str:
    ready = (
        '<a class="pill ok" href="/readyz">ready</a>' if o.ready else '<a class="pill bad" href="/readyz">not ready</a>'
    )
    return (
        f'<span class="node"><b>{h(o.ae_title)}</b> on {h(o.hostname)} · version {h(o.version)} · '
        f"DICOM port {o.dicom_port} · up {duration(now - o.started_at)}</span> {ready}"
    )


# -- overview ------------------------------------------------------------------------------------------


def _tiles(kind: str, per_state: dict[str, int], link: bool, active: str) -> str:
    out = [f'<div class="rowlabel">{h(kind)}</div><div class="tiles">']
    for state, n in per_state.items():
        cls = "tile" + (" bad" if state == "failed" and n else "") + (" zero" if not n else "")
        cls += " active" if link and state == active else ""
        inner = f'<div class="n">{n}</div><div class="k">{h(state)}</div>'
        if link:
            out.append(f'<a class="{cls}" href="/?state={quote(state)}" title="list {h(state)} studies">{inner}</a>')
        else:
            out.append(f'<div class="{cls}">{inner}</div>')
    out.append("</div>")
    return "".join(out)


def _checks_alert(o: Overview) -> str:
    bad = [(k, c) for k, c in o.checks.items() if not c.ok]
    if not bad:
        return ""
    items = "".join(f"<li><b>{h(k)}</b>: {h(c.detail)}</li>" for k, c in bad)
    return f'<div class="alert bad"><b>Not ready.</b><ul>{items}</ul></div>'


def engines_table(o: Overview) -> str:
    if not o.engines:
        return '<p class="muted">No engine loaded.</p>'
    rows = []
    for e in o.engines:
        status = (
            f'<span class="pill ok">validated{(" by " + h(e.validated_by)) if e.validated_by else ""}</span>'
            if e.validated
            else '<span class="pill bad">NOT validated</span>'
        )
        if e.demo:
            status += ' <span class="pill warn">demo</span>'
        thr = f"{e.threshold:.3f}" if e.threshold is not None else "-"
        rows.append(
            f"<tr><td><b>{h(e.name)}</b></td><td>{h(e.version)}</td><td>{h(e.backend)}</td>"
            f'<td class="num">{thr}</td><td>{status}</td></tr>'
        )
    return (
        "<table><thead><tr><th>Engine</th><th>Version</th><th>Backend</th><th>Threshold</th><th>Status</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def throughput_svg(t: Throughput) -> str:
    """A small grouped bar chart (inline SVG): per bin, images received, studies reported, SRs sent."""
    width, height = 720, 170
    left, right, top, bottom = 40, 10, 10, 26
    n = len(t.received)
    series = (
        ("b-rx", "images received", t.received),
        ("b-rep", "studies reported", t.reported),
        ("b-sent", "SRs sent", t.sent),
    )
    peak = max([1, *t.received, *t.reported, *t.sent])
    plot_w, plot_h = width - left - right, height - top - bottom
    group = plot_w / n
    bar = group * 0.26
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Throughput over the last hour in {t.bin_s // 60}-minute bins">'
    ]
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        value = peak * frac
        label = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
        parts.append(f'<line class="gl" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for i in range(n):
        x0 = left + i * group + group * 0.11
        minutes_ago = (n - i) * t.bin_s // 60
        for j, (cls, what, values) in enumerate(series):
            v = values[i]
            if not v:
                continue
            bh = plot_h * v / peak
            x = x0 + j * bar
            parts.append(
                f'<rect class="{cls}" x="{x:.1f}" y="{top + plot_h - bh:.1f}" width="{bar - 1:.1f}" height="{bh:.1f}">'
                f"<title>{v} {what}, {minutes_ago} to {minutes_ago - t.bin_s // 60} min ago</title></rect>"
            )
        if i % 2 == 0:
            parts.append(
                f'<text x="{left + i * group:.1f}" y="{height - 8}" text-anchor="start">-{minutes_ago} min</text>'
            )
    parts.append(f'<text x="{width - right}" y="{height - 8}" text-anchor="end">now</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/></svg>')
    legend = (
        f'<div class="legend"><span class="l-rx">images received <b>{sum(t.received)}</b></span>'
        f'<span class="l-rep">studies reported <b>{sum(t.reported)}</b></span>'
        f'<span class="l-sent">SRs sent <b>{sum(t.sent)}</b></span>'
        + ('<span class="muted">(busy hour: older events not counted)</span>' if t.partial else "")
        + "</div>"
    )
    return "".join(parts) + legend


def failures_table(failures: list[Failure], study_of: dict[str, str], now: float) -> str:
    if not failures:
        return '<p class="muted">No failures.</p>'
    rows = []
    for f in failures:
        study = study_of.get(f.uid, f.uid if f.kind in ("study", "outbox") else "")
        uid = study_link(study) if study and f.kind != "instance" else f'<span class="uid">{h(f.uid)}</span>'
        if f.kind == "instance" and study:
            uid += f'<div class="small">in {study_link(study)}</div>'
        dest = f'<div class="small muted">to {h(f.destination)}</div>' if f.destination else ""
        rows.append(
            f"<tr><td>{h(f.kind)}</td><td>{uid}{dest}</td><td>{h(f.reason)}</td>"
            f'<td class="small" title="{h(fmt_time(f.updated_at))}">{ago(f.updated_at, now)}</td></tr>'
        )
    return (
        "<table><thead><tr><th>What</th><th>UID</th><th>Reason</th><th>When</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def studies_table(o: Overview, now: float) -> str:
    if not o.studies:
        what = f" in state {h(o.state_filter)}" if o.state_filter else ""
        return f'<p class="muted">No study{what} yet.</p>'
    rows = []
    for s in o.studies:
        st = s.study
        sr = (
            f'<span class="pill ok" title="{h(st.sr_sop_instance_uid)}">SR</span>'
            if st.sr_path
            else '<span class="muted">-</span>'
        )
        reason = f'<div class="small muted">{h(st.reason)}</div>' if st.reason else ""
        rows.append(
            f"<tr><td>{study_link(st.study_uid)}</td><td>{state_badge(st.state)}{reason}</td>"
            f'<td class="num">{st.n_instances}</td><td>{finding_spans(s.findings)}</td><td>{sr}</td>'
            f'<td class="small" title="{h(fmt_time(st.updated_at))}">{ago(st.updated_at, now)}</td></tr>'
        )
    shown = f"{len(o.studies)} of {o.n_studies}" if o.n_studies > len(o.studies) else f"{o.n_studies}"
    filt = f' in state {state_badge(o.state_filter)} · <a href="/">all states</a>' if o.state_filter else ""
    return (
        f'<p class="small muted">Most recently updated first: {shown} '
        f"stud{'y' if o.n_studies == 1 else 'ies'}{filt}</p>"
        "<table><thead><tr><th>Study Instance UID</th><th>State</th><th>Images</th><th>Findings</th><th>SR</th>"
        f"<th>Updated</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def overview_page(
    o: Overview, principal: Principal | None, auth_enabled: bool, study_of: dict[str, str], now: float | None = None
) -> str:
    now = time.time() if now is None else now
    counts = (
        _tiles("Studies", o.counts.get("studies", {}), True, o.state_filter)
        + _tiles("Instances", o.counts.get("instances", {}), False, "")
        + _tiles("Outbox (SRs to send)", o.counts.get("outbox", {}), False, "")
    )
    dests = ", ".join(h(d) for d in o.destinations) or '<span class="muted">none configured</span>'
    body = f"""<main>
{_checks_alert(o)}
<div class="grid">
<section class="card" id="counts"><h2>Counts per state</h2>{counts}</section>
<section class="card" id="throughput"><h2>Throughput, last hour</h2>{throughput_svg(o.throughput)}
<p class="small muted">Destinations: {dests}</p></section>
</div>
<section class="card" id="engines"><h2>Engines</h2>{engines_table(o)}</section>
<section class="card" id="failures"><h2>Last failures</h2>{failures_table(o.failures, study_of, now)}</section>
<section class="card" id="studies"><h2>Studies</h2>{studies_table(o, now)}</section>
</main>"""
    return page(f"{o.ae_title} · cspine-screener", _node_line(o, now), body, principal, auth_enabled, refresh_s=30)


# -- one study -----------------------------------------------------------------------------------------


def _results_cell(results) -> str:
    if not results:
        return '<span class="muted">-</span>'
    lines = []
    for r in results:
        roi = " · ROI" if r.roi is not None else ""
        lines.append(
            f'<div><span class="finding {css_token(r.finding)}">{h(r.engine)}: {h(r.finding)}</span>'
            f'<span class="small muted">p={r.probability:.3f} (threshold {r.threshold:.3f}) · {h(r.backend)} · '
            f"v {h(r.engine_version)} · {r.seconds * 1000:.0f} ms{roi}</span></div>"
        )
    return "".join(lines)


def _actions(d: StudyDetail, principal: Principal | None, auth_enabled: bool, csrf: str) -> str:
    st = d.study
    if principal is None:
        if auth_enabled:
            return '<p class="small muted">Read-only. <a href="/login">Sign in</a> to resend or complete a study.</p>'
        return (
            '<p class="small muted">Read-only: actions (resend, complete now) need credentials in the '
            "<code>[http]</code> section of config.toml.</p>"
        )
    uid = quote(st.study_uid)
    forms = []
    failed_send = any(o.state == "failed" for o in d.outbox)
    if st.state == "failed" or failed_send:
        forms.append(
            f'<form class="inline" method="post" action="/studies/{uid}/resend">'
            f'<input type="hidden" name="csrf" value="{h(csrf)}"><button type="submit">Resend</button></form>'
        )
    if st.state == "receiving":
        forms.append(
            f'<form class="inline" method="post" action="/studies/{uid}/complete">'
            f'<input type="hidden" name="csrf" value="{h(csrf)}">'
            '<button type="submit" class="secondary">Complete now</button></form>'
        )
    if not forms:
        return '<p class="small muted">No action applies in this state.</p>'
    return "<div>" + "".join(forms) + "</div>"


def study_page(
    d: StudyDetail,
    principal: Principal | None,
    auth_enabled: bool,
    csrf: str = "",
    done: str = "",
    now: float | None = None,
    node_label: str = "",
) -> str:
    now = time.time() if now is None else now
    st = d.study
    msg = f'<div class="alert ok">{h(DONE_MESSAGES[done])}</div>' if done in DONE_MESSAGES else ""
    reason = f"<dt>Reason</dt><dd>{h(st.reason)}</dd>" if st.reason else ""
    if st.sr_path:
        sr = f'<dd><span class="uid wrap">{h(d.sr_file)}</span><div class="small muted">SR SOP Instance UID '
        sr += f'<span class="uid">{h(st.sr_sop_instance_uid)}</span></div>'
        if d.sr_folder_file:
            sr += f'<div class="small muted">copy: <span class="uid wrap">{h(d.sr_folder_file)}</span></div>'
        sr += "</dd>"
    else:
        sr = '<dd class="muted">not written yet</dd>'
    patient = ""
    if d.patient is not None:
        patient = (
            '<section class="card" id="patient"><h2>Patient</h2><div class="alert note small">Shown because '
            '<code>http.show_patient_data</code> is on and you are signed in.</div><dl class="facts">'
            f"<dt>Name</dt><dd>{h(d.patient.get('name'))}</dd><dt>ID</dt><dd>{h(d.patient.get('id'))}</dd>"
            f"<dt>Birth date</dt><dd>{h(d.patient.get('birth_date'))}</dd></dl></section>"
        )
    inst_rows = []
    for iv in d.instances:
        i = iv.row
        why = f'<div class="small muted">{h(i.reason)}</div>' if i.reason else ""
        inst_rows.append(
            f'<tr><td><span class="uid">{h(i.sop_instance_uid)}</span>'
            f'<div class="small muted">series <span class="uid">{h(i.series_uid)}</span></div></td>'
            f"<td>{h(SOP_CLASS_NAMES.get(i.sop_class_uid, i.sop_class_uid))}</td>"
            f"<td>{state_badge(i.state)}{why}</td><td>{_results_cell(iv.results)}</td></tr>"
        )
    instances = (
        "<table><thead><tr><th>SOP Instance UID</th><th>Class</th><th>State</th><th>Findings</th></tr></thead>"
        f"<tbody>{''.join(inst_rows)}</tbody></table>"
        if inst_rows
        else '<p class="muted">No instance (purged by retention?).</p>'
    )
    out_rows = [
        f'<tr><td>{h(o.destination)}</td><td>{state_badge(o.state)}</td><td class="num">{o.attempts}</td>'
        f'<td>{h(o.last_error) or "-"}</td><td class="small">{fmt_time(o.updated_at)}</td></tr>'
        for o in d.outbox
    ]
    outbox = (
        "<table><thead><tr><th>Destination</th><th>State</th><th>Attempts</th><th>Last error</th><th>Updated</th>"
        f"</tr></thead><tbody>{''.join(out_rows)}</tbody></table>"
        if out_rows
        else '<p class="muted">Nothing queued.</p>'
    )
    ev_rows = [
        f'<tr><td class="small">{fmt_time(e.at)}</td><td>{h(e.kind)}</td><td>{state_badge(e.state)}</td>'
        f'<td class="small">{h(e.detail)}</td></tr>'
        for e in reversed(d.events)
    ]
    events = (
        "<table><thead><tr><th>When</th><th>What</th><th>State</th><th>Detail</th></tr></thead>"
        f"<tbody>{''.join(ev_rows)}</tbody></table>"
    )
    body = f"""<main>
<p class="small"><a href="/">← all studies</a></p>
{msg}
<h1>Study <span class="uid">{h(st.study_uid)}</span></h1>
<div class="grid">
<section class="card" id="summary"><h2>Summary</h2><dl class="facts">
<dt>State</dt><dd>{state_badge(st.state)}</dd>{reason}
<dt>Images</dt><dd>{st.n_instances}</dd>
<dt>Findings</dt><dd>{finding_spans(d.findings)}</dd>
<dt>First received</dt><dd>{fmt_time(st.first_received_at)}</dd>
<dt>Last received</dt><dd>{fmt_time(st.last_received_at)} ({ago(st.last_received_at, now)})</dd>
<dt>Updated</dt><dd>{fmt_time(st.updated_at)}</dd>
<dt>SR</dt>{sr}
</dl></section>
<section class="card" id="actions"><h2>Actions</h2>{_actions(d, principal, auth_enabled, csrf)}
<h2>Sending</h2>{outbox}</section>
</div>
{patient}
<section class="card" id="instances"><h2>Images</h2>{instances}</section>
<section class="card" id="events"><h2>History</h2>{events}</section>
</main>"""
    header = f'<span class="node">{h(node_label)}</span>' if node_label else ""
    return page(f"Study {st.study_uid} · cspine-screener", header, body, principal, auth_enabled)


def message_page(title: str, text: str, principal: Principal | None, auth_enabled: bool) -> str:
    body = (
        f'<main><section class="card"><h1>{h(title)}</h1><p>{h(text)}</p>'
        '<p><a href="/">Status page</a></p></section></main>'
    )
    return page(title, "", body, principal, auth_enabled)
