"""Homeostasis: each tier keeps its SCREENED fraction inside a band by adapting its thresholds, its decay
and the horizon over which a circuit's usage u is averaged.

Too many SCREENED circuits (crystallization: nothing new can be learned) raise the tier's θ_on/θ_off, its
decay and its horizon (a circuit must be in use for longer to be screened); too few (amnesia: everything
fades) lower them. Inside the band they relax back toward the configured values, so a tier that was pushed
once does not stay pushed. Each tier starts from the configured values and drifts on its own: no tier has
a threshold, decay or horizon written for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import TIERS, DynamicsConfig

BAND = (0.05, 0.6)  # the SCREENED fraction a tier holds to, once it has enough circuits to measure it
MIN_CIRCUITS = 4
STEP = 1.05  # per tick outside the band: slow enough that a tier does not swing between the two failures
RELAX = 1.05  # per tick inside it, back toward the configured values (a slower 1.01 left the demo's context tier
# still amnesic from its second act when the team act began)
FLOORS = {"theta_on": 0.1, "theta_off": 0.02, "decay": 0.02, "horizon": 0.25}  # forgetting never stops entirely
MAX_HORIZON = 64.0


@dataclass
class TierRegulation:
    theta_on: float
    theta_off: float
    decay: float
    horizon: float  # ticks over which u is averaged, in units of the configured window_min
    initial: tuple[float, float, float, float]  # the configured values, where an idle regulator returns

    def adapt(self, screened_fraction: float) -> None:
        if screened_fraction > BAND[1]:  # crystallizing: harder to screen, faster fading
            self.theta_on = min(self.theta_on * STEP, 0.99)
            self.theta_off = min(self.theta_off * STEP, self.theta_on * 0.9)
            self.decay = min(self.decay * STEP, 0.5)
            self.horizon = min(self.horizon * STEP, MAX_HORIZON)
        elif screened_fraction < BAND[0]:  # amnesic: easier to screen, slower fading
            self.theta_on = max(self.theta_on / STEP, FLOORS["theta_on"])
            self.theta_off = max(min(self.theta_off / STEP, self.theta_on * 0.9), FLOORS["theta_off"])
            self.decay = max(self.decay / STEP, FLOORS["decay"])
            self.horizon = max(self.horizon / STEP, FLOORS["horizon"])
        else:  # inside the band: relax toward the configured values (nothing holds a tier away from them)
            self.theta_on, self.theta_off, self.decay, self.horizon = (
                min(v * RELAX, v0) if v < v0 else max(v / RELAX, v0)
                for v, v0 in zip((self.theta_on, self.theta_off, self.decay, self.horizon), self.initial)
            )


class Homeostasis:
    def __init__(self, config: DynamicsConfig) -> None:
        initial = (config.theta_on, config.theta_off, config.decay, 1.0)
        self.tiers = {t: TierRegulation(*initial, initial) for t in TIERS}

    def update(self, tier: str, phases: list[str]) -> None:
        if len(phases) >= MIN_CIRCUITS:
            self.tiers[tier].adapt(sum(p == "SCREENED" for p in phases) / len(phases))

    def state(self) -> dict:
        return {t: asdict(r) for t, r in self.tiers.items()}

    def restore(self, state: dict) -> None:
        for t, values in state.items():
            default = self.tiers[t]  # states saved before a field existed take the configured value
            self.tiers[t] = TierRegulation(**{**asdict(default), **values, "initial": default.initial})
