"""The report as one self-contained HTML file: inline CSS, a few lines of inline JS for the filters, plots as
inline SVG; nothing is fetched, so it opens from disk in any browser."""

from __future__ import annotations

import math
from html import escape

from .colors import NEGATIVE, POSITIVE, contribution_color
from .model import EpisodeView, IterationView, Page

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
.note{color:#555}.ok{color:#1a7f37;font-weight:600}.bad{color:#c00;font-weight:700}.warn{color:#9a6700}
.filters{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #eee;z-index:1}
.filters label{margin-right:14px}
.plots{display:flex;flex-wrap:wrap;gap:18px}.plot{background:#fafafa;border:1px solid #eee}
.ep{border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin:10px 0}
.meta{font-size:13px;color:#444;margin-bottom:6px}.role{font-weight:700}
.prompt,.resp{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px}
.prompt{color:#666;border-left:3px solid #ddd;padding-left:8px;margin-bottom:4px}
.tok{border-radius:2px}.legend{display:inline-block;width:220px;height:12px;vertical-align:middle;
border:1px solid #ccc}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
"""

JS = """
function applyFilters(){
  const it=document.getElementById('f-iter').value, k=document.getElementById('f-kept').value,
        r=document.getElementById('f-reward').value;
  document.querySelectorAll('[data-iteration]').forEach(function(el){
    let show=(it==='all'||el.dataset.iteration===it);
    if(el.classList.contains('ep')){show=show&&(k==='all'||el.dataset.kept===k)&&(r==='all'||el.dataset.reward===r);}
    el.style.display=show?'':'none';
  });
}
document.querySelectorAll('.filters select').forEach(function(s){s.addEventListener('change',applyFilters);});
applyFilters();
"""


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:+.3e}" if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:+.4g}"


def render(page: Page) -> str:
    """The whole page."""
    body = [f"<h1>Why was this episode kept? <code>{escape(page.title)}</code></h1>", header(page), filters(page),
            "<h2>Kept fraction per iteration</h2>", kept_fraction_svg(page)]
    body += [iteration_section(page, view) for view in page.iterations]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ippo inspect: "
            f"{escape(page.title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + f"\n<script>{JS}</script></body></html>\n")


def legend(page: Page) -> str:
    lo, hi = (f"rgb{NEGATIVE}", f"rgb{POSITIVE}")
    return (f"−{page.color_scale:.2g} <span class=\"legend\" style=\"background:linear-gradient(to right,{lo},#fff,"
            f"{hi})\"></span> +{page.color_scale:.2g}:")


def header(page: Page) -> str:
    facts = "".join(f"<li>{escape(k)}: {escape(str(v))}</li>" for k, v in page.settings.items())
    return (f"<p class=\"note\">Run <code>{escape(page.run_dir)}</code>; influence log <a href=\"{escape(page.log_href)}\">"
            f"{escape(page.log_href)}</a> (each episode links its line).</p><ul class=\"note\">{facts}</ul>"
            f"<p>θ_old (the policy an iteration sampled and scored with) is available for iteration(s) "
            f"<b>{escape(page.theta_old_text)}</b>. {escape(page.checkpoint_note)}</p>"
            "<p>Token colours: each response token's contribution to its episode's score ⟨∇L<sub>e</sub>, "
            f"G<sub>val</sub>⟩, taken at the position that predicts it. {legend(page)} "
            f"red pulls against the validation set, blue with it; intensity ∝ √|value|, saturated at "
            f"±{page.color_scale:.3g} (hover a token for its value). Only the episodes shown below were rebuilt and "
            "scored offline.</p>")


def filters(page: Page) -> str:
    its = "".join(f"<option value=\"{v.iteration}\"{' selected' if v.iteration == page.focus else ''}>"
                  f"{v.iteration}</option>" for v in page.iterations)
    rewards = "".join(f"<option value=\"{escape(r)}\">{escape(r)}</option>" for r in page.reward_values)
    return ("<div class=\"filters\"><label>iteration <select id=\"f-iter\"><option value=\"all\">all</option>"
            f"{its}</select></label><label>episodes <select id=\"f-kept\"><option value=\"all\">all</option>"
            "<option value=\"kept\">kept</option><option value=\"dropped\">dropped</option></select></label>"
            f"<label>reward <select id=\"f-reward\"><option value=\"all\">all</option>{rewards}</select></label></div>")


def iteration_section(page: Page, view: IterationView) -> str:
    rows = view.rows
    kept = [r for r in rows if r["kept"]]
    scores = [r["score"] for r in rows if r.get("score") is not None]
    stats = (f"<p>kept {len(kept)} of {len(rows)} episodes ({len(kept) / max(len(rows), 1):.2f}); mean reward "
             f"{sum(r['reward'] for r in rows) / max(len(rows), 1):.3f}; scores {fmt(min(scores, default=None))} … "
             f"{fmt(max(scores, default=None))}.</p>")
    head = f"<section class=\"iter\" id=\"it{view.iteration}\" data-iteration=\"{view.iteration}\">"
    out = [head + f"<h2>Iteration {view.iteration}</h2>", stats, verification(view), "<div class=\"plots\">"]
    by_reward: dict[str, list] = {}
    for r in rows:
        by_reward.setdefault(f"reward {r['reward']:g}", []).append(r)
    out.append(strip_svg("scores by reward", "scores-by-reward", by_reward))
    if view.categories is not None:
        by_cat: dict[str, list] = {}
        for r in rows:
            by_cat.setdefault(view.categories[r.episode], []).append(r)
        out.append(strip_svg("scores by category", "scores-by-category", dict(sorted(by_cat.items()))))
    out.append(weights_svg([float(r["weight"]) for r in kept]))
    out.append("</div>")
    if view.recomputed is not None and view.recomputed.episodes:
        out.append(f"<p class=\"note\">{legend(page)} a token's contribution to its episode's score (hover for "
                   "the value).</p>")
    out += [episode_card(page, view, ev) for ev in view.shown]
    out.append("</section>")
    return "\n".join(out)


def verification(view: IterationView) -> str:
    rec = view.recomputed
    if rec is None:
        return ("<p class=\"note\">No θ_old for this iteration: its episodes are shown without token colours "
                "(see above for the iterations that have one).</p>")
    if rec.problem is not None:
        return f"<p class=\"bad\">Token attribution not available: {escape(rec.problem)}.</p>"
    compared, n = rec.compared, len(rec.episodes)
    parts = [f"<p>Rebuilt {n} episode(s) at θ_old = <code>{escape(rec.source)}</code>. "]
    if compared and rec.all_match:
        parts.append(f"<span class=\"ok\">The recomputed scores of the {len(compared)} episode(s) scored at "
                     f"θ_old equal the logged ones</span> (largest relative difference {rec.max_rel_diff:.1e}, "
                     f"tolerance {view.rtol:g}).")
    elif compared:
        bad = [a.episode for a in compared if not a.matches]
        parts.append(f"<span class=\"bad\">The recomputed scores of {len(bad)} of {len(compared)} episode(s) do NOT "
                     f"equal the logged ones (episodes {', '.join(map(str, bad[:20]))}; largest relative difference "
                     f"{rec.max_rel_diff:.1e} &gt; {view.rtol:g}): the colours below may not explain the logged "
                     "selection.</span>")
    later = n - len(compared)
    if later:
        parts.append(f" <span class=\"warn\">{later} episode(s) were scored inside the update after an optimizer "
                     "step (influence.timing=in_update, a later mini-batch): their logged scores are at those "
                     "parameters, not θ_old, so they are not compared; their colours are θ_old's.</span>")
    parts.append("</p>")
    return "".join(parts)


def episode_card(page: Page, view: IterationView, ev: EpisodeView) -> str:
    r, a = ev.row, ev.attribution
    kept = "kept" if r["kept"] else "dropped"
    score = f"score {fmt(r.get('score'))}"
    if a is not None:
        mark = "" if not a.compared else (" <span class=\"ok\">✓</span>" if a.matches else
                                          " <span class=\"bad\">✗ differs</span>")
        score += f" (recomputed {fmt(a.score)}{mark})"
    cat = f" · {escape(ev.category)}" if ev.category else ""
    adv = r.get("advantage")
    adv = (f" · advantage {adv:+.3g}" if isinstance(adv, (int, float)) else
           f" · advantage per token, mean {sum(adv) / len(adv):+.3g}" if adv else f" · advantage sum {r['adv_sum']:+.3g}")
    after = r.get("scored_after_steps")
    late = f" · scored after {after} optimizer step(s)" if after else ""
    weight = f" · weight {float(r['weight']):.3g}" if r["kept"] else ""
    meta = (f"<span class=\"role\">{escape(ev.role)}</span> · episode {r.episode} (prompt row {r['prompt_id']}, "
            f"sample {r.get('sample', '?')}) · reward {r['reward']:g}{adv} · {score} · <b>{kept}</b>"
            f"{weight}{cat}{late} · "
            f"<a href=\"{escape(page.log_href)}\" title=\"line {r.line} of influence.jsonl\">influence.jsonl line "
            f"{r.line}</a>")
    prompt = escape(ev.prompt_text)
    if a is not None:
        prompt += f" <span class=\"note\">[prompt positions: {fmt(a.prompt)}]</span>"
    return (f"<div class=\"ep\" id=\"it{view.iteration}-ep{r.episode}\" data-iteration=\"{view.iteration}\" "
            f"data-kept=\"{kept}\" data-reward=\"{escape(page.reward_key(r['reward']))}\"><div class=\"meta\">{meta}"
            f"</div><div class=\"prompt\">{prompt}</div><div class=\"resp\">{response_html(page, ev)}</div></div>")


def response_html(page: Page, ev: EpisodeView) -> str:
    a = ev.attribution
    if a is None or ev.pieces is None:
        return escape(ev.row.get("response", ""))
    spans = []
    for j, (piece, value) in enumerate(zip(ev.pieces, a.tokens)):
        color = contribution_color(value, page.color_scale)
        spans.append(f"<span class=\"tok\" style=\"background:{color}\" title=\"token {j} {escape(repr(piece))}: "
                     f"{value:+.3e}\">{escape(piece)}</span>")
    return "".join(spans)


# ---------------------------------------------------------------------------------------------- plots


def kept_fraction_svg(page: Page, w: int = 620, h: int = 170) -> str:
    pts = [(v.iteration, sum(bool(r["kept"]) for r in v.rows) / max(len(v.rows), 1), v.theta_old)
           for v in page.iterations]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    sx = (lambda i: 40 + (w - 60) * (i - x0) / (x1 - x0)) if x1 > x0 else (lambda i: w / 2)
    sy = lambda f: h - 25 - (h - 40) * f
    line = " ".join(f"{sx(i):.1f},{sy(f):.1f}" for i, f, _ in pts)
    dots = "".join(f"<circle cx=\"{sx(i):.1f}\" cy=\"{sy(f):.1f}\" r=\"{5 if t else 3}\" fill=\"{'#2166ac' if t else '#999'}\">"
                   f"<title>iteration {i}: kept {f:.2f}{' (θ_old available)' if t else ''}</title></circle>"
                   for i, f, t in pts)
    ticks = "".join(f"<text x=\"{sx(i):.1f}\" y=\"{h - 8}\" font-size=\"10\" text-anchor=\"middle\">{i}</text>"
                    for i, _, _ in pts[:: max(1, len(pts) // 15)])
    axis = (f"<line x1=\"40\" y1=\"{sy(0):.1f}\" x2=\"{w - 20}\" y2=\"{sy(0):.1f}\" stroke=\"#999\"/>"
            f"<text x=\"34\" y=\"{sy(1) + 4:.1f}\" font-size=\"10\" text-anchor=\"end\">1</text>"
            f"<text x=\"34\" y=\"{sy(0) + 4:.1f}\" font-size=\"10\" text-anchor=\"end\">0</text>")
    return (f"<svg class=\"plot kept-fraction\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" "
            f"xmlns=\"http://www.w3.org/2000/svg\">{axis}<polyline points=\"{line}\" fill=\"none\" stroke=\"#2166ac\"/>"
            f"{dots}{ticks}</svg><p class=\"note\">Large blue dots: iterations whose θ_old is available.</p>")


def strip_svg(title: str, cls: str, groups: dict[str, list], w: int = 420) -> str:
    """One row of dots per group at x = score: filled = kept, open = dropped."""
    scored = [(g, float(r["score"]), bool(r["kept"])) for g, rs in groups.items() for r in rs
              if r.get("score") is not None and math.isfinite(float(r["score"]))]
    h = 44 + 26 * len(groups)
    lo = min([s for _, s, _ in scored] + [0.0])
    hi = max([s for _, s, _ in scored] + [0.0])
    span = (hi - lo) or 1.0
    sx = lambda s: 110 + (w - 130) * (s - lo) / span
    rows = {g: k for k, g in enumerate(groups)}
    out = [f"<text x=\"8\" y=\"16\" font-size=\"12\" font-weight=\"600\">{escape(title)}</text>",
           f"<line x1=\"{sx(0):.1f}\" y1=\"24\" x2=\"{sx(0):.1f}\" y2=\"{h - 18}\" stroke=\"#bbb\" stroke-dasharray=\"3\"/>"]
    for g, k in rows.items():
        n = len(groups[g])
        out.append(f"<text x=\"8\" y=\"{40 + 26 * k}\" font-size=\"11\">{escape(g)} ({n})</text>")
    for n, (g, s, kept) in enumerate(scored):
        y = 36 + 26 * rows[g] + ((n * 7) % 11) - 5  # deterministic jitter
        style = "fill=\"#2166ac\"" if kept else "fill=\"none\" stroke=\"#b2182b\""
        out.append(f"<circle cx=\"{sx(s):.1f}\" cy=\"{y}\" r=\"3\" {style}/>")
    out.append(f"<text x=\"110\" y=\"{h - 4}\" font-size=\"10\">{fmt(lo)}</text>"
               f"<text x=\"{w - 20}\" y=\"{h - 4}\" font-size=\"10\" text-anchor=\"end\">{fmt(hi)}</text>")
    return (f"<svg class=\"plot {cls}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" "
            f"xmlns=\"http://www.w3.org/2000/svg\">{''.join(out)}<title>{escape(title)}: filled = kept, open = "
            "dropped</title></svg>")


def weights_svg(weights: list[float], w: int = 300, h: int = 150, bins: int = 20) -> str:
    """Histogram of the kept episodes' weights."""
    out = ["<text x=\"8\" y=\"16\" font-size=\"12\" font-weight=\"600\">weights of the kept episodes</text>"]
    if weights:
        lo, hi = min(weights), max(weights)
        width = (hi - lo) / bins or 1.0
        counts = [0] * bins
        for x in weights:
            counts[min(bins - 1, int((x - lo) / width))] += 1
        top = max(counts)
        bw = (w - 40) / bins
        for b, n in enumerate(counts):
            bh = (h - 50) * n / top
            out.append(f"<rect x=\"{20 + b * bw:.1f}\" y=\"{h - 22 - bh:.1f}\" width=\"{bw - 1:.1f}\" "
                       f"height=\"{bh:.1f}\" fill=\"#4393c3\"><title>{lo + b * width:.3g}–{lo + (b + 1) * width:.3g}:"
                       f" {n}</title></rect>")
        out.append(f"<text x=\"20\" y=\"{h - 6}\" font-size=\"10\">{lo:.3g}</text><text x=\"{w - 20}\" y=\"{h - 6}\" "
                   f"font-size=\"10\" text-anchor=\"end\">{hi:.3g}</text>")
    else:
        out.append(f"<text x=\"20\" y=\"{h / 2}\" font-size=\"11\">no episode kept</text>")
    return (f"<svg class=\"plot weights\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" "
            f"xmlns=\"http://www.w3.org/2000/svg\">{''.join(out)}</svg>")
