"""The 2012 two-tower AlexNet, the paper's training rule and schedule, and the step functions."""
from model.alexnet import AlexNet
from model.optim import PaperSGD, load_velocity_state, param_groups, velocity_state
from model.schedule import PlateauSchedule
from model.train_step import EvalResult, evaluate, prepare_model, train_step
from model.views import ten_views

__all__ = [
    "AlexNet",
    "EvalResult",
    "PaperSGD",
    "PlateauSchedule",
    "evaluate",
    "load_velocity_state",
    "param_groups",
    "prepare_model",
    "ten_views",
    "train_step",
    "velocity_state",
]
