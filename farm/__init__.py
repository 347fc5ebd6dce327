"""videofarm: a self-hostable, distributed text-to-video render farm on Ray."""

__version__ = "0.1.0"
GENERATOR_NAME = "videofarm"
