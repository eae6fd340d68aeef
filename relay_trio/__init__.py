"""relay-trio: a reliable, rate-limited report relay built on Trio structured concurrency."""

from ._model import Accepted as Accepted
from ._model import Problem as Problem
from ._model import Report as Report

__version__ = "0.1.0"
