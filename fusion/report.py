"""FusionReport: what was fused, why, and how fast, as a table, a dict, an HTML page or a PNG."""
from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field

import torch

_COPY_BANDWIDTH: dict[str, float] = {}


def copy_bandwidth(device: str = "cuda" if torch.cuda.is_available() else "cpu") -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), once per process."""
    if device in _COPY_BANDWIDTH:
        return _COPY_BANDWIDTH[device]
    is_cuda = torch.device(device).type == "cuda"
    n = (256 if is_cuda else 32) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if is_cuda:
        from triton.testing import do_bench

        seconds = do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3
    else:
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            samples.append(time.perf_counter() - start)
        seconds = sorted(samples)[len(samples) // 2]
    _COPY_BANDWIDTH[device] = 2 * n * 4 / seconds
    return _COPY_BANDWIDTH[device]


@dataclass
class GroupRecord:
    name: str  # pattern name or "generic"
    kind: str  # "pattern" or "generic"
    nodes: int
    ops: list[str] = field(default_factory=list)
    hash: str = ""
    decision: bool = False
    reason: str = ""
    decided_by: str = "static"  # "static", "profiled", or a remembered profile: "memory" / "disk"
    compile_seconds: float = 0.0
    cache_hit: str | None = None  # "memory", "disk" or None (generated)
    t_fused: float | None = None
    t_fallback: float | None = None
    bytes_moved: int | None = None
    timing: str | None = None  # how t_fused / t_fallback were measured: "graph" (CUDA graph) or "eager"
    shape: str = ""  # largest input, e.g. "32x4096 bfloat16": the shape bucket rows are grouped by
    traffic: tuple[int, int] | None = None  # bytes moved per call (unfused, fused), from tensor sizes

    @property
    def gbps(self) -> float | None:
        if self.t_fused and self.bytes_moved:
            return self.bytes_moved / self.t_fused / 1e9
        return None

    @property
    def speedup(self) -> float | None:
        if self.t_fused and self.t_fallback:
            return self.t_fallback / self.t_fused
        return None


class FusionReport:
    def __init__(self):
        self.groups: list[GroupRecord] = []
        self.compile_seconds = 0.0

    def add(self, record: GroupRecord) -> GroupRecord:
        self.groups.append(record)
        return record

    def _bandwidth(self) -> float | None:
        return copy_bandwidth() if any(g.gbps for g in self.groups) else None

    def to_dict(self) -> dict:
        bw = self._bandwidth()
        groups = []
        for g in self.groups:
            d = asdict(g)
            d["traffic"] = list(g.traffic) if g.traffic else None  # as JSON reads it back
            d["gbps"] = g.gbps
            d["speedup"] = g.speedup
            d["fraction_of_copy_bandwidth"] = g.gbps * 1e9 / bw if bw and g.gbps else None
            groups.append(d)
        rows = [{"name": g.name, "kind": g.kind, "hash": g.hash, "shape": g.shape, "count": n,
                 "decision": g.decision, "reason": g.reason, "timing": g.timing, "t_fused": g.t_fused,
                 "t_fallback": g.t_fallback, "speedup": g.speedup, "gbps": g.gbps} for g, n in self.rows()]
        return {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "copy_bandwidth_gbps": bw / 1e9 if bw else None,
            "compile_seconds": self.compile_seconds,
            "fused": sum(g.decision for g in self.groups),
            "summary": self.summary(),
            "groups": groups,  # one per occurrence
            "rows": rows,  # aggregated per (pattern, structure, shape bucket, outcome)
        }

    def rows(self) -> list[tuple[GroupRecord, int]]:
        """Groups aggregated per (pattern, structure, shape bucket, outcome), with occurrence counts,
        in first-seen order."""
        counts: dict[tuple, list] = {}
        for g in self.groups:
            key = (g.name, g.kind, g.hash, g.shape, g.decision, g.reason)
            counts.setdefault(key, [g, 0])[1] += 1
        return [(g, n) for g, n in counts.values()]

    def summary(self) -> str:
        """One line: occurrences, fused count, distinct rows and, if profiled, the summed time of
        the fused occurrences per program run, fused vs unfused."""
        fused = [g for g in self.groups if g.decision]
        line = f"{len(self.groups)} groups, {len(fused)} fused; {len(self.rows())} distinct"
        sized = [g.traffic for g in fused if g.traffic]
        if sized:
            line += (f"; fused groups move {_bytes(sum(t[1] for t in sized))} per run "
                     f"against {_bytes(sum(t[0] for t in sized))} unfused")
        timed = [g for g in fused if g.t_fused and g.t_fallback]
        if timed:
            modes = "/".join(sorted({g.timing or "eager" for g in timed}))
            line += (f"; fused groups per run ({modes} timing): {sum(g.t_fused for g in timed) * 1e6:.1f} us fused vs "
                     f"{sum(g.t_fallback for g in timed) * 1e6:.1f} us unfused")
        return line

    def __str__(self) -> str:
        bw = self._bandwidth()
        head = ["group", "count", "shape", "nodes", "fused", "decided by", "compile [ms]", "cache", "fused [us]",
                "unfused [us]", "speedup", "GB/s", "% copy", "reason"]
        rows = []
        us = (lambda t: f"{t * 1e6:.1f}" if t else "-")
        for g, count in self.rows():
            rows.append([g.name, str(count), g.shape or "-", str(g.nodes), "yes" if g.decision else "no",
                         g.decided_by, f"{g.compile_seconds * 1e3:.1f}", g.cache_hit or "-", us(g.t_fused),
                         us(g.t_fallback), f"{g.speedup:.2f}x" if g.speedup else "-",
                         f"{g.gbps:.1f}" if g.gbps else "-",
                         f"{100 * g.gbps * 1e9 / bw:.0f}" if bw and g.gbps else "-", g.reason])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]

        def fmt(r):
            return "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]

        title = f"FusionReport: {self.summary()}"
        notes = ["times are per call"]
        modes = {g.timing for g in self.groups if g.timing}
        if modes:
            notes.append("measured " + " and ".join("inside a CUDA graph" if m == "graph" else "with Python launches"
                                                    for m in sorted(modes))
                         + ", kernels launched serially (fusion.launch)")
        if bw:
            notes.append(f"device copy bandwidth {bw / 1e9:.1f} GB/s")
        return "\n".join([title, "(" + "; ".join(notes) + ")", fmt(head), *(fmt(r) for r in rows)])

    def _charts(self) -> list[tuple[str, str, list[tuple[str, float, float]]]]:
        """What the pictures draw, one chart per measure: (title, unit, [(row label, unfused, fused)]).
        Time per call where groups were timed; always the bytes each fused group moves per call."""
        charts = []
        timed = [(g, n) for g, n in self.rows() if g.t_fused and g.t_fallback]
        if timed:
            charts.append(("time per call", "us", [(_label(g, n), g.t_fallback * 1e6, g.t_fused * 1e6)
                                                   for g, n in timed]))
        sized = [(g, n) for g, n in self.rows() if g.decision and g.traffic]
        if sized:
            charts.append(("memory traffic per call, from tensor sizes", "KB",
                           [(_label(g, n), g.traffic[0] / 1e3, g.traffic[1] / 1e3) for g, n in sized]))
        return charts

    def save_html(self, path) -> None:
        """A standalone page: inline SVG bar charts of unfused against fused time and traffic, and
        the table of every group."""
        bar_h, width = 18, 520
        svgs = []
        for title, unit, bars in self._charts():
            top = max(max(u, f) for _, u, f in bars) or 1.0
            parts = [f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>']
            for k, (label, unfused, fused) in enumerate(bars):
                y = 24 + k * (2 * bar_h + 12)
                for j, (v, color, name) in enumerate([(unfused, "#bbb", "unfused"), (fused, "#2a7", "fused")]):
                    w = max(1.0, width * v / top)
                    parts.append(f'<rect x="220" y="{y + j * bar_h}" width="{w:.1f}" height="{bar_h - 2}" '
                                 f'fill="{color}"/><text x="{225 + w:.1f}" y="{y + j * bar_h + 13}" '
                                 f'font-size="11">{name} {v:.1f} {unit}</text>')
                parts.append(f'<text x="0" y="{y + bar_h + 4}" font-size="12">{html.escape(label)}</text>')
            height = 24 + len(bars) * (2 * bar_h + 12)
            svgs.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 380}" height="{height}">'
                        + "".join(parts) + "</svg>")
        d = self.to_dict()
        cols = ["name", "nodes", "decision", "reason", "compile_seconds", "cache_hit", "t_fused", "t_fallback",
                "speedup", "traffic", "bytes_moved", "gbps", "fraction_of_copy_bandwidth"]
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(g[c]))}</td>" for c in cols) + "</tr>"
                       for g in d["groups"])
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>difuse fusion report</title>"
                f"<style>body{{font-family:sans-serif}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style>"
                f"</head><body><h1>difuse fusion report</h1><p>device: {html.escape(d['device'])}; "
                f"copy bandwidth: {_cell(d['copy_bandwidth_gbps'])} GB/s; compile: "
                f"{d['compile_seconds']:.3f} s</p><p>{html.escape(d['summary'])}</p>{''.join(svgs)}<table><tr>"
                + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{rows}</table></body></html>")
        with open(path, "w") as f:
            f.write(page)

    def save_png(self, path) -> None:
        """Bar charts of unfused against fused time and traffic per group (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("FusionReport.save_png needs matplotlib (pip install difuse[bench])") from e
        charts = self._charts()
        if not charts:
            raise ValueError("nothing to draw: the report has no timed group and no fused group")
        rows = max(len(bars) for _, _, bars in charts)
        fig, axes = plt.subplots(1, len(charts), figsize=(7 * len(charts), 1.2 + 0.45 * rows), squeeze=False)
        for ax, (title, unit, bars) in zip(axes[0], charts):
            ys = range(len(bars))
            ax.barh([y + 0.2 for y in ys], [u for _, u, _ in bars], 0.4, label="unfused", color="#bbb")
            ax.barh([y - 0.2 for y in ys], [f for _, _, f in bars], 0.4, label="fused", color="#2a7")
            ax.set_yticks(list(ys), [label for label, _, _ in bars], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"{title} ({unit})")
            ax.legend(fontsize=8)
        fig.suptitle(f"difuse fusion report: {self.summary()}", fontsize=9, wrap=True)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _label(g: GroupRecord, count: int) -> str:
    return f"{g.name} {g.shape}" + (f" x{count}" if count > 1 else "")


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
