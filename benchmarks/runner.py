"""Running the measurements: the pyDVL yardstick venv, and child processes (benchmarks/child.py), each
cut at its cap and at its section's deadline. Returns what the children measured; nothing here
formats or writes the page.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import workloads as W

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_VENV = ROOT / ".bench-venv"
PYDVL_REQUIREMENTS = [
    "torch==2.13.0",
    "pydvl[influence]==0.10.*",
    "zarr>=3",
    "dask[array]",
    "distributed",
    "scikit-learn",
]
#: The kronfluence yardstick venv (benchmarks/kron_child.py's "kronfluence" side): its own, since
#: kronfluence must not see infscale. INFSCALE_KRONFLUENCE_VENV points at another (an existing one).
KRONFLUENCE_VENV = Path(os.environ.get("INFSCALE_KRONFLUENCE_VENV", ROOT / ".bench-venv-kronfluence"))
#: Installed in this order; then torchvision (pulled in by kronfluence, never imported by it) is
#: uninstalled: PyPI's build does not load against the CPU torch ("operator torchvision::nms does not
#: exist") and then breaks transformers' model imports (benchmarks/kronfluence_yardstick.py).
KRONFLUENCE_REQUIREMENTS = [
    ["torch==2.13.0"],
    ["torch==2.13.0", "kronfluence==1.0.1", "transformers", "scikit-learn"],
]


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def ensure_bench_venv(enabled: bool) -> tuple[str | None, str]:
    """Python of the pyDVL yardstick venv (created and cached on first use), or None and why not."""
    if not enabled:
        return None, "disabled (--no-pydvl)"
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".installed"
    if not stamp.exists():
        log("creating the pyDVL benchmark venv", BENCH_VENV)
        try:
            if not python.exists():
                subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *PYDVL_REQUIREMENTS], check=True)
            stamp.touch()
        except (subprocess.CalledProcessError, OSError) as error:
            return None, f"could not create {BENCH_VENV.name}: {error}"
    try:
        version = subprocess.run(
            [str(python), "-c", "import pydvl; print(pydvl.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as error:
        return None, f"pyDVL does not import: {error.stderr[-300:]}"
    return str(python), version


def ensure_kronfluence_venv() -> tuple[str | None, str]:
    """Python of the kronfluence yardstick venv (created and cached on first use), or None and why
    not; the second item is kronfluence's version when it imports."""
    python = KRONFLUENCE_VENV / "bin" / "python"
    stamp = KRONFLUENCE_VENV / ".installed"
    if not stamp.exists() and not python.exists():
        log("creating the kronfluence benchmark venv", KRONFLUENCE_VENV)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(KRONFLUENCE_VENV)], check=True)
            for packages in KRONFLUENCE_REQUIREMENTS:
                subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
            subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=True)
            stamp.touch()
        except (subprocess.CalledProcessError, OSError) as error:
            return None, f"could not create {KRONFLUENCE_VENV}: {error}"
    try:
        version = subprocess.run(
            [str(python), "-c", "import kronfluence, transformers; print(kronfluence.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, OSError) as error:
        return None, f"kronfluence does not import in {KRONFLUENCE_VENV}: {str(error)[-300:]}"
    return str(python), version


class Runner:
    """Saves workloads and runs child processes, each cut at its cap and at the section's deadline."""

    def __init__(self, workdir: Path, pydvl_python: str | None, sizes: dict):
        self.workdir, self.pydvl_python = workdir, pydvl_python
        self.timeout_s, self.slow_s = sizes["run_timeout_s"], sizes["slow_run_s"]
        self.repeats, self.short_s = sizes["repeats"], sizes["short_run_s"]
        self.deadline = float("inf")  # set by main() at the start of each section
        self.count = 0

    @property
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self, name: str, model, loss_name: str, data: dict) -> Path:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        arch = {"layers": W.architecture(model), "dtype": dtype, "loss": loss_name}
        (d / "arch.json").write_text(json.dumps(arch))
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, d / "model.pt")
        torch.save({k: v.contiguous() for k, v in data.items()}, d / "data.pt")
        return d

    def run(self, lib: str, workload: Path, slow: bool = False, **spec) -> dict:
        """One measurement; returns the child's result, with "values" (the array) when saved.

        A timed run (no ``task="self"``) that takes less than ``short_run_s`` is repeated in the same
        child, fit included, and the best of ``repeats`` is kept (``result["runs"]``). ``slow=True``
        marks a run known to be hopeless (cut at ``slow_run_s`` instead of ``run_timeout_s``)."""
        return self.run_jobs(lib, [(workload, spec)], slow)[0]

    def run_jobs(
        self,
        lib: str,
        jobs: list,
        slow: bool = False,
        python: str | None = None,
        script: str = "child.py",
        cap_s: float | None = None,
    ) -> list[dict]:
        """Several measurements in one child process (they share its imports; the peak RSS of all
        but the first includes the earlier ones'). jobs: [(workload dir, spec)]. ``python`` (default:
        this one for infscale and the floor, pyDVL's venv for pyDVL) runs ``script`` (in benchmarks/);
        ``cap_s`` replaces the cap per job (a reference computation known to be long)."""
        python = python or (sys.executable if lib in ("infscale", "floor") else self.pydvl_python)
        if python is None:
            name = {"pydvl": "pyDVL"}.get(lib, lib)
            return [{"error": f"{name} not available", "unavailable": True} for _ in jobs]
        cap = cap_s or (self.slow_s if slow else self.timeout_s)
        limit = min(cap * len(jobs), self.left)
        if limit < 5:
            return [{"error": "skipped: time budget", "skipped": True} for _ in jobs]
        specs = []
        for workload, spec in jobs:
            self.count += 1
            out = self.workdir / f"run{self.count:03d}-{lib}-{spec.get('method', '')}"
            scratch = self.workdir / f"scratch{self.count:03d}"
            scratch.mkdir()
            spec = {"repeats": self.repeats, "repeat_under_s": self.short_s, **spec}
            if spec.get("task") == "self":
                spec["repeats"] = 1
            specs.append(
                {"threads": 2}
                | spec
                | {"lib": lib, "workdir": str(workload), "out": str(out), "scratch": str(scratch)}
            )
        spec_path = Path(specs[0]["out"] + ".spec.json")
        spec_path.write_text(json.dumps({"jobs": specs}))
        env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONWARNINGS="ignore")
        start = time.perf_counter()
        timed_out = False
        # own session: on timeout the whole group goes (Dask worker processes included)
        proc = subprocess.Popen(
            [python, str(HERE / script), str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, stderr = proc.communicate()
        results = []
        for spec in specs:
            result_path = Path(spec["out"] + ".json")
            label = f"  {lib:8s} {spec.get('method', ''):9s} {spec.get('task', 'memory'):10s}"
            if not result_path.exists():
                if timed_out:
                    why = "cap" if limit >= cap * len(jobs) - 1 else "section budget"
                    blocks = written_blocks(spec)
                    log(f"{label} timeout after {limit:.0f} s ({why}){blocks and ', ' + blocks}")
                    results.append(
                        {
                            "error": f"timeout after {limit:.0f} s",
                            "timeout": True,
                            "total_s": limit,
                            "blocks": blocks,
                        }
                    )
                else:
                    tail = (stderr or "")[-400:]
                    results.append({"error": f"child exited {proc.returncode}: {tail}"})
                continue
            result = json.loads(result_path.read_text())
            result["process_s"] = time.perf_counter() - start
            values = Path(spec["out"] + ".npy")
            if values.exists():
                result["values"] = np.load(values)
                values.unlink()
            state = result.get("error") or (
                f"{result.get('total_s', float('nan')):.2f} s (best of {result.get('runs', 1)})"
            )
            log(f"{label} {state[:200]}")
            results.append(result)
        return results


def written_blocks(spec: dict) -> str:
    """For a calculator run cut by its timeout: how many of its zarr blocks were written ('' if none)."""
    if spec.get("task") not in ("sequential", "dask"):
        return ""
    store = Path(spec["scratch"]) / f"{Path(spec['out']).name}.zarr" / "c"
    done = sum(1 for f in store.rglob("*") if f.is_file()) if store.exists() else 0
    return f"{done} of {spec['n_blocks']} blocks written" if spec.get("n_blocks") else ""


# ---------------------------------------------------------------------------- the machine, as data
def machine_info() -> dict:
    """The machine as plain data: system, arch, cores, cpu, ram_gib, load_at_start (None if unknown)."""
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        ram = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        pass
    return {
        "system": platform.system(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": ram,
        "load_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def versions_info(pydvl_version: str) -> dict:
    """Versions of Python and of the libraries measured (pyDVL's, or why it is not there)."""
    import platform

    import dask
    import zarr

    try:
        from importlib.metadata import version

        infscale_version = version("infscale")
    except Exception:  # noqa: BLE001
        infscale_version = "?"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "infscale": infscale_version,
        "pydvl": pydvl_version,
    }
