"""Noise processes behind one interface (`Process`, `ddpm.processes.base`): the discrete DDPM
schedule, EDM, flow matching and score_sde's VP-SDE. Samplers, objectives, evaluation and
distillation call the interface and never ask which process they hold; adding a process is a
class and a line in `REGISTRY`.
"""

from typing import Any

from ddpm.processes.base import Level, Process, StepLevels, karras_sigmas, vp_of_ve
from ddpm.processes.discrete import Discrete
from ddpm.processes.edm import EDM
from ddpm.processes.flow import Flow
from ddpm.processes.vpsde import VPSDE
from ddpm.schedules import Schedule

REGISTRY: dict[str, type[Process]] = {"ddpm": Discrete, "edm": EDM, "flow": Flow, "vpsde": VPSDE}
PROCESSES = tuple(REGISTRY)

__all__ = [
    "EDM",
    "VPSDE",
    "Discrete",
    "Flow",
    "Level",
    "Process",
    "StepLevels",
    "karras_sigmas",
    "vp_of_ve",
]


def create(diffusion: Any, learned_variance: bool = False) -> Process:
    """The process `diffusion.process` names, from `config.diffusion` (and
    `config.model.learn_sigma`). A bad field: ValueError naming it (within its section)."""
    return REGISTRY[diffusion.process].from_config(diffusion, learned_variance)


def as_process(process: Process | Schedule) -> Process:
    """A process as it is; a bare discrete `Schedule` as the DDPM process of its tables (the
    samplers' and the likelihood's public entry points take either)."""
    return Discrete(process) if isinstance(process, Schedule) else process
