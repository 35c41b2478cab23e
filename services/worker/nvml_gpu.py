"""`NvmlGpu`: a CUDA worker's GPU through NVML (`nvidia-ml-py`, imported as `pynvml` when first used).

    read   nvmlDeviceGetPowerUsage (mW), nvmlDeviceGetTotalEnergyConsumption (mJ since the driver loaded;
           reported here since the worker started), nvmlDeviceGetEnforcedPowerLimit (mW),
           nvmlDeviceGetClockInfo / GetMaxClockInfo (SM, MHz)
    apply  only with `--power-control`: `clocks` locks the SM clock (nvmlDeviceSetGpuLockedClocks, reset by
           nvmlDeviceResetGpuLockedClocks), `power-limit` sets the board limit
           (nvmlDeviceSetPowerManagementLimit, reset to nvmlDeviceGetPowerManagementDefaultLimit). Both
           need root (a privileged pod); neither survives a driver reload, and `close()` undoes what this
           worker set. The default, `off`, only reads: never change a shared or lent GPU.

Which GPU: `--device cuda:N` is the N-th visible device; CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs)
maps it to NVML's numbering, which ignores that variable.
"""
from __future__ import annotations

import os
import threading
import time

from services.worker.power import GpuReading, PowerControl


def nvml_index(device: str, visible: str | None = None) -> int | str:
    """NVML's index (or UUID) of a torch device string ("cuda", "cuda:1")."""
    ordinal = int(device.partition(":")[2] or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return ordinal
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if ordinal >= len(entries):
        raise ValueError(f"device {device}: CUDA_VISIBLE_DEVICES={visible!r} lists only {len(entries)} GPU(s)")
    entry = entries[ordinal]
    return int(entry) if entry.isdigit() else entry


class NvmlGpu:
    name = "nvml"

    def __init__(self, device: str = "cuda", control: PowerControl = PowerControl.OFF, nvml=None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                raise RuntimeError("reading GPU power needs nvidia-ml-py (pip install nvidia-ml-py)") from None
        self.nvml = nvml
        self.control = control
        nvml.nvmlInit()
        index = nvml_index(device)
        self.handle = nvml.nvmlDeviceGetHandleByUUID(index) if isinstance(index, str) else \
            nvml.nvmlDeviceGetHandleByIndex(index)
        self.max_clock_mhz = float(nvml.nvmlDeviceGetMaxClockInfo(self.handle, nvml.NVML_CLOCK_SM))
        self.clock_cap_mhz: float | None = None
        self._changed_limit = False
        self._lock = threading.Lock()
        self._energy_start_mj = self._total_energy_mj()
        self._integrated_j, self._last = 0.0, None      # when the energy counter is not supported

    def _total_energy_mj(self) -> int | None:
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except self.nvml.NVMLError:     # pre-Volta GPUs: integrate the power readings instead
            return None

    def read(self) -> GpuReading:
        nvml, h = self.nvml, self.handle
        watts = nvml.nvmlDeviceGetPowerUsage(h) / 1000
        with self._lock:
            if self._energy_start_mj is not None:
                joules = (self._total_energy_mj() - self._energy_start_mj) / 1000
            else:
                now = time.monotonic()
                if self._last is not None:
                    self._integrated_j += (now - self._last[0]) * (watts + self._last[1]) / 2
                self._last = (now, watts)
                joules = self._integrated_j
        return GpuReading(power_watts=watts, energy_joules=joules,
                          power_limit_watts=nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
                          clock_mhz=float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
                          max_clock_mhz=self.max_clock_mhz, clock_cap_mhz=self.clock_cap_mhz)

    def limits(self) -> tuple[float, float]:
        """(lowest, highest) power limit one may set, in watts."""
        low, high = self.nvml.nvmlDeviceGetPowerManagementLimitConstraints(self.handle)
        return low / 1000, high / 1000

    def apply(self, clock_mhz: float | None, watts: float | None) -> str:
        nvml, h = self.nvml, self.handle
        if self.control is PowerControl.OFF:
            raise PermissionError("this worker only reads its GPU (--power-control off): start it with "
                                  "--power-control clocks or power-limit where the deployment allows it")
        try:
            if self.control is PowerControl.CLOCKS:
                if clock_mhz is None:
                    nvml.nvmlDeviceResetGpuLockedClocks(h)
                    self.clock_cap_mhz = None
                    return "SM clock unlocked"
                clock = int(min(clock_mhz, self.max_clock_mhz))
                nvml.nvmlDeviceSetGpuLockedClocks(h, 0, clock)
                self.clock_cap_mhz = float(clock)
                return f"SM clock locked to at most {clock} MHz"
            if watts is None:
                limit_mw = nvml.nvmlDeviceGetPowerManagementDefaultLimit(h)
            else:
                low, high = self.limits()
                limit_mw = int(min(max(watts, low), high) * 1000)
            nvml.nvmlDeviceSetPowerManagementLimit(h, limit_mw)
            self._changed_limit = watts is not None
            return f"power limit {limit_mw / 1000:.0f} W"
        except nvml.NVMLError as e:
            if getattr(e, "value", None) == getattr(nvml, "NVML_ERROR_NO_PERMISSION", object()):
                raise PermissionError(f"NVML refused the cap (needs root or a privileged pod): {e}") from None
            raise RuntimeError(f"NVML could not apply the cap: {e}") from None

    def close(self) -> None:
        """Undo what this worker set (caps outlive the process otherwise), then shut NVML down."""
        try:
            if self.clock_cap_mhz is not None:
                self.apply(None, None)
            if self._changed_limit:
                self.apply(None, None)
        except (PermissionError, RuntimeError):
            pass
        finally:
            self.nvml.nvmlShutdown()
