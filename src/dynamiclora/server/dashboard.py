"""The dashboard at ``/``: tiers, circuits and phases, migrations over time, cache hit rates and time scales.

The page is static; it reads ``/dashboard/data`` and four plots rendered here with matplotlib (no script or
font from elsewhere, so it works offline), with the admin key given as ``?key=`` in the page's address, and
refreshes every few seconds. It reports what it loaded in ``#status`` (the headless-browser test reads it).
"""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from ..config import TIERS
from .protocol import APIError
from .service import Service, service

PHASE_COLOURS = {"SCREENED": "#1f77b4", "FREE": "#ff7f0e"}


def data(dl) -> dict[str, Any]:
    """A snapshot of what the dashboard shows (taken on the engine thread)."""
    circuits = dl.circuits()
    return {
        "tick": dl.tick_count,
        "interactions": dl.interactions,
        "agents": sorted(dl.hierarchy.agents),
        "circuits": [
            {k: c.get(k) for k in ("id", "tier", "scope", "phase", "u", "strength", "rank", "label")} for c in circuits
        ],
        "migrations": [{k: m.get(k) for k in ("tick", "from", "to", "kind", "label")} for m in dl.migrations()],
        "timescales": {
            t: {k: v[k] for k in ("ticks", "lower_bound", "window", "circuits")} for t, v in dl.timescales().items()
        },
        "cache": dl.wavegen.statistics(),
    }


def _png(draw) -> bytes:
    from matplotlib.figure import Figure  # the object API: safe to use from several threads

    fig = Figure(figsize=(5.2, 3.0), dpi=100)
    ax = fig.add_subplot()
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_tiers(snapshot: dict) -> bytes:
    counts = Counter((c["tier"], c["phase"]) for c in snapshot["circuits"])
    tiers = list(reversed(TIERS))

    def draw(ax):
        bottom = [0] * len(tiers)
        for phase, colour in PHASE_COLOURS.items():
            values = [counts[(t, phase)] for t in tiers]
            ax.bar(tiers, values, bottom=bottom, label=phase, color=colour)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("circuits")
        ax.set_title(f"circuits per tier and phase (tick {snapshot['tick']})")
        ax.legend(fontsize=8)

    return _png(draw)


def plot_migrations(snapshot: dict) -> bytes:
    moves = sorted(snapshot["migrations"], key=lambda m: m["tick"])

    def draw(ax):
        by_boundary: dict[str, list[int]] = {}
        for m in moves:
            boundary = f"{m['from'].split(':')[0]} → {m['to'].split(':')[0]}"
            by_boundary.setdefault(boundary, []).append(m["tick"])
        for boundary, ticks in sorted(by_boundary.items()):
            ax.step(ticks, range(1, len(ticks) + 1), where="post", label=boundary)
        if by_boundary:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no migration yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("tick")
        ax.set_ylabel("migrations (cumulative)")
        ax.set_title("migrations over time")

    return _png(draw)


def plot_cache(snapshot: dict) -> bytes:
    tiers = snapshot["cache"]["tiers"]

    def draw(ax):
        names = list(tiers)
        ax.bar(names, [tiers[t]["hit_rate"] for t in names], color="#2ca02c")
        ax.set_ylim(0, 1)
        ax.set_ylabel("hit rate")
        ax.set_title(f"WaveGen hit rate per tier ({snapshot['cache']['lookups']} lookups)")

    return _png(draw)


def plot_timescales(snapshot: dict) -> bytes:
    scales = snapshot["timescales"]
    tiers = [t for t in reversed(TIERS) if scales[t]["ticks"]]

    def draw(ax):
        if tiers:
            ax.bar(tiers, [scales[t]["ticks"] for t in tiers], color="#9467bd")
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "nothing measured yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("ticks")
        ax.set_title("measured time scale per tier (mean residence)")

    return _png(draw)


PLOTS = {"tiers": plot_tiers, "migrations": plot_migrations, "cache": plot_cache, "timescales": plot_timescales}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DynamicLoRA</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
 .plots { display: grid; grid-template-columns: repeat(2, 520px); gap: 12px; }
 .plots img { width: 520px; height: 300px; border: 1px solid #ddd; }
 table { border-collapse: collapse; margin-top: 1em; font-size: 13px; }
 td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
 #status { color: #666; font-size: 12px; }
</style></head>
<body>
<h1>DynamicLoRA</h1>
<p id="summary">loading…</p>
<p id="batch"></p>
<div class="plots">
 <img id="plot-tiers" alt="circuits per tier"><img id="plot-migrations" alt="migrations over time">
 <img id="plot-cache" alt="cache hit rates"><img id="plot-timescales" alt="time scales">
</div>
<table><thead><tr><th>id</th><th>tier</th><th>scope</th><th>phase</th><th>u</th><th>strength</th><th>label</th>
</tr></thead><tbody id="circuits"></tbody></table>
<p id="status">status: starting</p>
<script>
"use strict";
const key = new URLSearchParams(location.search).get("key") || "";
const names = ["tiers", "migrations", "cache", "timescales"];
const errors = [];
window.addEventListener("error", (e) => { errors.push(String(e.message)); });
function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); }
async function refresh() {
  let loaded = 0;
  try {
    const r = await fetch("/dashboard/data?key=" + encodeURIComponent(key));
    if (!r.ok) { throw new Error("data: HTTP " + r.status); }
    const d = await r.json();
    document.getElementById("summary").textContent =
      `tick ${d.tick} · ${d.interactions} interactions · ${d.agents.length} agents · ` +
      `${d.circuits.length} circuits · ${d.migrations.length} migrations · cache hit rate ` +
      (d.cache.hit_rate * 100).toFixed(1) + "%";
    if (d.batch) {
      document.getElementById("batch").textContent =
        `live batch (${d.batch.batching}): ${d.batch.rows} rows of ${d.batch.agents.length} agents · ` +
        `${d.batch.queued} waiting · ${d.batch.tokens_per_s.toFixed(1)} tokens/s since start`;
    }
    const body = document.getElementById("circuits");
    body.replaceChildren();
    for (const c of d.circuits.slice(0, 200)) {
      const row = document.createElement("tr");
      for (const v of [c.id.slice(0, 8), c.tier, c.scope, c.phase, (c.u || 0).toFixed(2),
                       (c.strength || 0).toFixed(2), c.label]) { cell(row, v); }
      body.appendChild(row);
    }
    await Promise.all(names.map((n) => new Promise((resolve) => {
      const img = document.getElementById("plot-" + n);
      img.onload = () => { if (img.naturalWidth > 0) { loaded += 1; } resolve(); };
      img.onerror = () => { errors.push("plot " + n + " failed"); resolve(); };
      img.src = `/dashboard/plot/${n}.png?key=${encodeURIComponent(key)}&t=${Date.now()}`;
    })));
  } catch (e) {
    errors.push(String(e));
  }
  document.getElementById("status").textContent = `plots loaded: ${loaded} errors: ${errors.length}` +
    (errors.length ? " (" + errors.join("; ") + ")" : "");
}
refresh();
setInterval(refresh, 5000);
</script>
</body></html>
"""


def dashboard_key(request: Request, svc: Service = Depends(service)) -> None:
    """The dashboard's data need the admin key, given as ``?key=`` (the page cannot send a header)."""
    key = request.query_params.get("key", "")
    who = svc.keys.resolve(key) if key else None
    if who is None or not who.admin:
        raise APIError(401, "the dashboard's data needs the admin key (?key=...)", "authentication_error")


router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def page():
    return PAGE


@router.get("/dashboard/data", dependencies=[Depends(dashboard_key)])
async def dashboard_data(svc: Service = Depends(service)):
    return await svc.run(lambda: {**data(svc.dl), "batch": svc.engine.live()})


@router.get("/dashboard/plot/{name}.png", dependencies=[Depends(dashboard_key)])
async def dashboard_plot(name: str, svc: Service = Depends(service)):
    if name not in PLOTS:
        raise APIError(404, f"no plot {name!r}; choose from {sorted(PLOTS)}", "not_found_error")
    snapshot = await svc.run(lambda: data(svc.dl))
    png = await asyncio.to_thread(PLOTS[name], snapshot)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
