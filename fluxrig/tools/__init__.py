"""Operator tools built on the Rack's codecs and framers (load generator, ...)."""
