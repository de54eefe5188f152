"""AttackReport: what a re-emergence attack achieved, on the attacked model and (side by side) the unedited one.

Only scores, budgets and salted fingerprints are kept: never the target's photos, their embeddings, or the
embeddings an attack found (those would be the person's identity by another name)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class AttackReport:
    """`rows`: one dict per (model, attack setting): `model` ("attacked" / "unedited" / a relearn setting),
    `asr` (share of the attack's generations verified as the target), `best_similarity` (highest cosine of any
    attack generation to the target's photos), `verified` / `generations` (the counts ASR is made of) and
    `curve` (the same at each budget checkpoint). `.asr` / `.best_similarity` are the attacked model's."""

    kind: str
    rows: list
    threshold: float
    far: float
    details: dict = field(default_factory=dict)

    def _row(self, name: str) -> dict:
        for r in self.rows:
            if r["model"] == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r['model'] for r in self.rows]}")

    @property
    def asr(self) -> float:
        return self.rows[0]["asr"]

    @property
    def best_similarity(self) -> float:
        return self.rows[0]["best_similarity"]

    @property
    def baseline_asr(self) -> float | None:
        return next((r["asr"] for r in self.rows if r["model"] == "unedited"), None)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "threshold": self.threshold, "far": self.far, "rows": self.rows,
                           **self.details}, indent=2, sort_keys=True, default=float)

    def save(self, directory, overwrite: bool = True) -> Path:
        """attack.json into `directory`, written atomically."""
        from fastforget.io import atomic_write_bytes

        directory = Path(directory)
        atomic_write_bytes(directory / "attack.json", self.to_json().encode(), overwrite=overwrite)
        return directory

    def table(self) -> str:
        """One line per row: model, ASR (verified / generations), best similarity, and the budget curve."""
        lines = [f"{self.kind} attack  (verified = cosine to the target's photos > {self.threshold:.3f}, "
                 f"FAR {self.far:g})",
                 f"{'model':<28} {'ASR':>6} {'verified':>9} {'best sim':>9}  "
                 f"curve ({self.details.get('curve_unit', 'budget')}: ASR)"]
        for r in self.rows:
            curve = " ".join(f"{c.get('input', format(c['budget'], 'g'))}:{c['asr']:.2f}" for c in r.get("curve", []))
            lines.append(f"{r['model']:<28} {r['asr']:>6.3f} {r['verified']:>4}/{r['generations']:<4} "
                         f"{r['best_similarity']:>9.3f}  {curve}")
        return "\n".join(lines)

    def __getitem__(self, name: str) -> dict:
        return self._row(name)
