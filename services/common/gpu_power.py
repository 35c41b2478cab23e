"""The GPU power/clock model shared by the simulated power backend (services/worker/power.py), the sim
engine's step time (services/engine/sim_profile.py) and the power controller's predictions
(services/scheduler/policies/power.py). Pure: numbers in, numbers out.

    power(u, f)   = idle + (peak - idle) * u * (k_mem + (1 - k_mem) * (f / f_max) ** alpha)
    step(f)       = overhead + max(compute * f_max / f, memory * (f_max / f) ** beta)

`u` is the share of wall time the GPU is busy (inside engine steps). The dynamic power splits into a
part that follows the SM clock (dynamic CMOS power ~ f * V^2 with V rising with f in the DVFS range,
so ~ f^2..f^3: alpha = 2.5) and a part that does not (HBM and the rest of the board: k_mem = 0.25).
Compute-bound work (prefill) takes 1/f longer at a lower clock; memory-bound work (decode at small
batches) barely slows (beta = 0.1: 7% slower at half the clock), which is why capping the clock of a
decode pool saves power at little latency cost (POLCA ASPLOS'24; throttLL'eM HPCA'25).

Calibration (what is published, and what is assumed):
  * H100 SXM5: 700 W maximum TDP, configurable (NVIDIA H100 Tensor Core GPU datasheet); max boost
    clock 1980 MHz; supported graphics clocks down to 345 MHz, power-limit range 200..700 W
    (`nvidia-smi -q -d SUPPORTED_CLOCKS,POWER` on an H100 SXM5).
  * H200 SXM: "up to 700 W (configurable)", the same power envelope as the H100 SXM (NVIDIA H200
    datasheet), same clock range. Read through NVML on an H200 (driver 580.159.04) for this change
    (docs/power.md, "Measured"): 77.8 W with nothing running (SM at 345 MHz), limits 200..700 W,
    SM clock max 1980 MHz; 119 W with a worker's CUDA context up and no work (SM at 1980 MHz).
  * Idle: 60-100 W on an H100/H200 SXM with nothing running; 70 W (H100, assumed) and 78 W (H200, read).
  * Memory-bound decode draws far less than the TDP: 137-300 W on an H200 across four attention
    families (Ma et al., "The Illusion of Power Capping in LLM Decode", arXiv 2605.11999, 2026); the
    simulated backend does not model the intensity of the work (a fully busy step draws `peak`
    whatever it computes), so it overstates decode power; the controller only needs it consistent.
  * alpha, beta and k_mem are modelling assumptions, not measurements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MEMORY_CLOCK_EXPONENT = 0.1      # beta: how much memory-bound work slows at a lower SM clock


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU type's power envelope and clock range."""
    name: str
    peak_watts: float = 700.0           # board power at full use and the maximum clock (the TDP)
    idle_watts: float = 70.0
    min_clock_mhz: float = 345.0        # lowest SM clock one can lock
    max_clock_mhz: float = 1980.0
    min_power_limit_watts: float = 200.0
    clock_step_mhz: float = 15.0        # granularity of the clocks the controller picks
    alpha: float = 2.5                  # clock-following dynamic power ~ (f / f_max) ** alpha
    k_mem: float = 0.25                 # share of the dynamic power that does not follow the SM clock

    def __post_init__(self) -> None:
        if not 0 <= self.idle_watts <= self.peak_watts:
            raise ValueError(f"GPU {self.name}: need 0 <= idle_watts ({self.idle_watts}) <= peak_watts "
                             f"({self.peak_watts})")
        if not 0 < self.min_clock_mhz <= self.max_clock_mhz:
            raise ValueError(f"GPU {self.name}: need 0 < min_clock_mhz ({self.min_clock_mhz}) <= max_clock_mhz "
                             f"({self.max_clock_mhz})")
        if not 0 <= self.k_mem <= 1 or self.alpha <= 0 or self.clock_step_mhz <= 0:
            raise ValueError(f"GPU {self.name}: need 0 <= k_mem <= 1, alpha > 0 and clock_step_mhz > 0")

    @property
    def dynamic_watts(self) -> float:
        return self.peak_watts - self.idle_watts

    def clock_ratio(self, clock_mhz: float | None) -> float:
        """f / f_max of a clock (None: uncapped, the maximum), within the supported range."""
        if clock_mhz is None:
            return 1.0
        return min(max(clock_mhz, self.min_clock_mhz), self.max_clock_mhz) / self.max_clock_mhz

    def clock_scale(self, clock_mhz: float | None) -> float:
        """Dynamic power at this clock over dynamic power at the maximum clock, same busy share."""
        return self.k_mem + (1 - self.k_mem) * self.clock_ratio(clock_mhz) ** self.alpha

    def power_watts(self, utilization: float, clock_mhz: float | None = None) -> float:
        """Board power when busy `utilization` (0..1) of the time at this SM clock."""
        return self.idle_watts + self.dynamic_watts * min(max(utilization, 0.0), 1.0) * self.clock_scale(clock_mhz)

    def utilization_at(self, watts: float, clock_mhz: float | None = None) -> float:
        """The busy share that explains a power reading at this clock (the inverse of power_watts)."""
        dynamic = self.dynamic_watts * self.clock_scale(clock_mhz)
        return min(max((watts - self.idle_watts) / dynamic, 0.0), 1.0) if dynamic > 0 else 0.0

    def power_limit_for(self, clock_mhz: float | None) -> float:
        """A power limit that lets a fully busy GPU run at this clock, within the limits one may set."""
        return min(max(self.power_watts(1.0, clock_mhz), self.min_power_limit_watts), self.peak_watts)

    def clocks(self) -> tuple[float, ...]:
        """The clocks the controller chooses from, highest first (the maximum, then steps down)."""
        n = math.floor((self.max_clock_mhz - self.min_clock_mhz) / self.clock_step_mhz)
        steps = [self.max_clock_mhz - i * self.clock_step_mhz for i in range(n + 1)]
        return tuple(steps if steps[-1] == self.min_clock_mhz else [*steps, self.min_clock_mhz])


# The idle figures: see the module docstring (H200: read through NVML on the lent GPU machine).
H100_SXM = GpuSpec("h100-sxm", peak_watts=700.0, idle_watts=70.0)
H200_SXM = GpuSpec("h200-sxm", peak_watts=700.0, idle_watts=78.0)
GPU_SPECS = {spec.name: spec for spec in (H100_SXM, H200_SXM)}


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPU_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}: use one of {', '.join(GPU_SPECS)}") from None


@dataclass(frozen=True, slots=True)
class StepCost:
    """One engine step at the maximum clock, split the way the roofline splits it (seconds)."""
    compute_s: float
    memory_s: float
    overhead_s: float = 0.0

    def seconds_at(self, clock_ratio: float) -> float:
        """The step's time at SM clock ratio f / f_max (0 < ratio <= 1)."""
        return step_seconds(self.compute_s, self.memory_s, self.overhead_s, clock_ratio)


def step_seconds(compute_s, memory_s, overhead_s, clock_ratio: float = 1.0):
    """overhead + max(compute / r, memory / r ** beta), on numbers or numpy arrays (np.maximum-free for
    scalars so this module needs no numpy)."""
    if clock_ratio <= 0:
        raise ValueError(f"clock ratio must be > 0, got {clock_ratio}")
    compute = compute_s / clock_ratio
    memory = memory_s / clock_ratio ** MEMORY_CLOCK_EXPONENT
    if isinstance(compute, float | int) and isinstance(memory, float | int):
        return overhead_s + max(compute, memory)
    return overhead_s + (compute > memory) * compute + (compute <= memory) * memory
