"""The status page's one stylesheet and its icon, served by the app (no CDN, no build step)."""

STYLE_CSS = """\
:root {
  --fg: #1d2430; --muted: #5b6676; --bg: #f4f6f9; --card: #fff; --line: #dde2ea;
  --accent: #1f5f99; --ok: #1e7b45; --warn: #a35a00; --bad: #b3261e;
  --rx: #4f7fb8; --rep: #2f9e6a; --sent: #9a6fc0;
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--fg); background: var(--bg); }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
header.top { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 18px; padding: 10px 22px;
  background: #17324f; color: #fff; }
header.top .brand { font-weight: 700; font-size: 17px; letter-spacing: .2px; }
header.top .brand a { color: #fff; }
header.top .node { color: #c9d6e6; }
header.top .spacer { flex: 1; }
header.top .who { color: #c9d6e6; font-size: 13px; }
header.top .who a { color: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 22px 28px; }
section.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
  margin: 0 0 16px; overflow-x: auto; }
h1 { font-size: 20px; margin: 4px 0 12px; }
h2 { font-size: 15px; margin: 0 0 10px; color: #23364d; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 16px;
  margin: 0 0 16px; }
.grid > section.card { margin: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; text-transform: uppercase; letter-spacing: .3px; }
tr:last-child td { border-bottom: 0; }
.uid { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size: 12.5px; white-space: nowrap; }
.wrap, h1 .uid { white-space: normal; word-break: break-all; }
.muted { color: var(--muted); }
.small { font-size: 12px; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.pill { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px; font-weight: 600;
  border: 1px solid transparent; white-space: nowrap; }
.pill.ok { background: #e3f4ea; color: var(--ok); border-color: #b8e0c7; }
.pill.bad { background: #fbe7e5; color: var(--bad); border-color: #f1bcb6; }
.pill.warn { background: #fff1dc; color: var(--warn); border-color: #f2d3a4; }
.pill.info { background: #e6eef8; color: var(--accent); border-color: #c5d6ec; }
.state { display: inline-block; padding: 1px 8px; border-radius: 4px; font-size: 12px; font-weight: 600;
  background: #eceff4; color: #394454; white-space: nowrap; }
.s-sent, .s-reported, .s-screened { background: #e3f4ea; color: var(--ok); }
.s-receiving, .s-complete, .s-screening, .s-pending, .s-received { background: #e6eef8; color: var(--accent); }
.s-failed { background: #fbe7e5; color: var(--bad); }
.s-skipped { background: #f1f1f1; color: #6b6b6b; }
.finding { white-space: nowrap; margin-right: 10px; }
.finding.present { color: var(--bad); font-weight: 600; }
.finding.absent { color: var(--ok); }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; margin: 4px 0 10px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 4px 10px; min-width: 86px; background: #fafbfd; }
.tile .n { font-size: 18px; font-weight: 700; font-variant-numeric: tabular-nums; }
.tile .k { font-size: 12px; color: var(--muted); }
.tile.bad { border-color: #f1bcb6; background: #fdf3f2; }
.tile.bad .n { color: var(--bad); }
.tile.zero .n { color: #9aa3af; }
.tile.active { outline: 2px solid var(--accent); }
.rowlabel { font-size: 12px; color: var(--muted); font-weight: 600; text-transform: uppercase; margin-top: 4px; }
.alert { border-radius: 6px; padding: 8px 12px; margin: 0 0 14px; }
.alert.bad { background: #fbe7e5; border: 1px solid #f1bcb6; color: #7d1a14; }
.alert.ok { background: #e3f4ea; border: 1px solid #b8e0c7; color: #14522e; }
.alert.note { background: #fff8e6; border: 1px solid #f2dfa4; color: #6b4a00; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
svg.chart { width: 100%; max-width: 760px; height: auto; display: block; }
svg.chart .axis { stroke: #b8c0cc; stroke-width: 1; }
svg.chart .gl { stroke: #eceff4; stroke-width: 1; }
svg.chart text { font-size: 11px; fill: #5b6676; }
.b-rx { fill: var(--rx); } .b-rep { fill: var(--rep); } .b-sent { fill: var(--sent); }
.legend { display: flex; gap: 16px; font-size: 12px; color: var(--muted); margin-top: 4px; }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 10px; margin-right: 5px;
  border-radius: 2px; vertical-align: -1px; background: currentColor; }
.legend .l-rx { color: var(--rx); } .legend .l-rep { color: var(--rep); } .legend .l-sent { color: var(--sent); }
.legend b { color: var(--fg); font-weight: 600; }
form.inline { display: inline-block; margin: 0 8px 0 0; }
button { font: inherit; padding: 4px 12px; border-radius: 5px; border: 1px solid var(--accent);
  background: var(--accent); color: #fff; cursor: pointer; }
button.secondary { background: #fff; color: var(--accent); }
footer { max-width: 1240px; margin: 0 auto; padding: 0 22px 24px; color: var(--muted); font-size: 12px; }
footer a { margin-right: 12px; }
"""

FAVICON_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" fill="#17324f"/>\
<g fill="#fff"><rect x="12" y="4" width="8" height="4" rx="1.5"/><rect x="12" y="10" width="8" height="4" rx="1.5"/>\
<rect x="12" y="16" width="8" height="4" rx="1.5"/><rect x="12" y="22" width="8" height="4" rx="1.5"/></g></svg>
"""
