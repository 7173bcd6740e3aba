"""Scenarios: parse, interpolate, validate, model. See model.py and validate.py."""

from .model import Endpoint, GearSpec, Scenario, WireSpec, interpolate, parse_scenario
from .validate import build_scenario, load_scenario, read_scenario_doc, validate_scenario

__all__ = [
    "Endpoint",
    "GearSpec",
    "Scenario",
    "WireSpec",
    "interpolate",
    "parse_scenario",
    "build_scenario",
    "load_scenario",
    "read_scenario_doc",
    "validate_scenario",
]
