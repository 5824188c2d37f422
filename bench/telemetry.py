"""GPU telemetry through NVML (nvidia-ml-py, imported as pynvml), sampled in a background thread during each suite.

Static facts (name, driver, memory, clock and power limits) are read once; clocks, power, temperature and the
clock-throttle reasons are sampled every `interval_s` while a suite runs and summarised per suite. Any throttle
reason other than "GPU idle" / "applications clocks setting" / "display clocks" marks the suite as throttled, and
the report flags it: its timings were taken below the device's normal clocks.
Where NVML is absent (CPU machine, no driver, package missing) the reason is recorded instead.
"""
from __future__ import annotations

import threading
import time

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency, but a broken install must not stop a benchmark
    pynvml = None

# NVML clock-event (throttle) reason bits, nvml.h (stable ABI values).
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clocks_setting",
}
BENIGN = {"gpu_idle", "applications_clocks_setting", "display_clocks_setting"}


def decode_reasons(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if mask & bit]


def summarize(samples: list[dict]) -> dict:
    """Per-suite summary of samples {sm_clock_mhz, mem_clock_mhz, power_w, temp_c, throttle_mask}."""
    if not samples:
        return {"samples": 0, "throttled": False, "throttle_reasons": []}
    out: dict = {"samples": len(samples)}
    for key in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c"):
        vals = [s[key] for s in samples if s.get(key) is not None]
        if vals:
            out[key] = {"min": min(vals), "mean": sum(vals) / len(vals), "max": max(vals)}
    seen = set()
    masks = [s.get("throttle_mask") for s in samples]
    for m in masks:
        seen.update(decode_reasons(m or 0))
    out["throttle_reasons"] = sorted(seen)
    out["throttled"] = bool(seen - BENIGN)
    # Samples whose reasons could not be read: "throttled": False then only covers the others (none: unknown).
    out["throttle_unread"] = sum(m is None for m in masks)
    return out



def _read_each(reads: dict) -> dict:
    """{key: read()} for each NVML query; a query this GPU or driver does not support gives None, not an error."""
    out = {}
    for key, read in reads.items():
        try:
            out[key] = read()
        except Exception:
            out[key] = None
    return out

class Telemetry:
    """telemetry = Telemetry(device); with telemetry.during("suite"): ...; telemetry.as_dict()."""

    def __init__(self, device, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.suites: dict[str, dict] = {}
        self.static: dict = {}
        self.reason: str | None = None
        self._handle = None
        self._throttle_fn = None
        if getattr(device, "type", "cpu") != "cuda":
            self.reason = "no GPU: telemetry samples NVML, which only CUDA devices have"
        elif pynvml is None:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
        else:
            try:
                pynvml.nvmlInit()
                self._handle = self._find_handle(device)
                self.static = self._read_static()
            except Exception as e:  # pynvml.NVMLError and driver problems: record, never stop the run
                self.reason = f"NVML unavailable: {type(e).__name__}: {e}"
                self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    @staticmethod
    def _find_handle(device):
        # CUDA_VISIBLE_DEVICES renumbers devices; NVML does not. Match by PCI bus id when torch exposes it.
        import torch
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
            try:
                return pynvml.nvmlDeviceGetHandleByPciBusId(pci)
            except Exception:
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(idx)

    def _read_static(self) -> dict:
        h = self._handle

        def text(v):
            return v.decode() if isinstance(v, bytes) else v

        info = {"name": text(pynvml.nvmlDeviceGetName(h)),
                "driver": text(pynvml.nvmlSystemGetDriverVersion()),
                "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)}
        optional = {
            "max_sm_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "max_mem_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
            "cuda_driver_version": lambda: pynvml.nvmlSystemGetCudaDriverVersion(),
        }
        return {**info, **_read_each(optional)}

    def sample(self) -> dict:
        h = self._handle
        s: dict = {"t": time.time()}
        reads = {
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "temp_c": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "mem_used_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(h).used),
            "throttle_mask": self._throttle_mask,
        }
        return {**s, **_read_each(reads)}

    def _throttle_mask(self) -> int:
        # Renamed "clock event reasons" in NVML 12.535; nvidia-ml-py 13 has both Python functions whatever the
        # driver, and a pre-535 driver lacks the new C symbol (NVMLError_FunctionNotFound at call time, not at
        # getattr). So try the new name, fall back to the old one once it fails, and remember which works.
        names = ([self._throttle_fn] if getattr(self, "_throttle_fn", None) else
                 ["nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"])
        err = None
        for name in names:
            fn = getattr(pynvml, name, None)
            if fn is None:
                continue
            try:
                mask = int(fn(self._handle))
            except Exception as e:  # pynvml.NVMLError_FunctionNotFound / _NotSupported
                err = e
                continue
            self._throttle_fn = name
            return mask
        raise err if err is not None else RuntimeError("this pynvml has no clock-event-reasons query")

    def during(self, suite: str) -> "_Sampling":
        return _Sampling(self, suite)

    def driver(self) -> str | None:
        return self.static.get("driver")

    def as_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason, "static": self.static,
                "interval_s": self.interval_s, "suites": self.suites}


class _Sampling:
    def __init__(self, telemetry: Telemetry, suite: str):
        self.t, self.suite = telemetry, suite
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = None

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(self.t.sample())
            self._stop.wait(self.t.interval_s)

    def __enter__(self):
        if self.t.available:
            self._thread = threading.Thread(target=self._loop, name=f"nvml-{self.suite}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.t.suites[self.suite] = summarize(self.samples)
        else:
            self.t.suites[self.suite] = {"samples": 0, "throttled": False, "throttle_reasons": [],
                                         "reason": self.t.reason}
        return False
