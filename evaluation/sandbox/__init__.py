"""Run untrusted generated Python safely: one sandboxed process per program, with a reason for every failure."""

from evaluation.sandbox.runner import Limits, Outcome, run_program, run_programs

__all__ = ["Limits", "Outcome", "run_program", "run_programs"]
