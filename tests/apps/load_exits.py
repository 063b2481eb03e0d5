"""A module that calls sys.exit() while it is imported (e.g. its own argparse)."""

from __future__ import annotations

import sys

sys.exit("load_exits: refusing to start without CONFIG")
