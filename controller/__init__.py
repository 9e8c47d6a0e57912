"""Searchers that propose architecture codes and learn from their rewards.

One interface (:class:`controller.base.Searcher`: ``ask`` / ``tell`` / ``state_dict`` / ``save`` /
``load``) and four implementations, built from the ``controller`` config group by
:func:`controller.build.build_searcher`:

- ``ppo`` (:mod:`controller.ppo`) and ``reinforce`` (:mod:`controller.reinforce`): the LSTM policy
  of :mod:`controller.policy`, trained after every finished candidate;
- ``random`` (:mod:`controller.random_search`) and ``evolution`` (:mod:`controller.evolution`):
  the baselines a learned controller has to beat.
"""
from controller.base import ControllerError, Proposal, Searcher
from controller.build import build_searcher

__all__ = ["ControllerError", "Proposal", "Searcher", "build_searcher"]
