"""`python -m gbx_client` runs the gbx command line."""

from __future__ import annotations

import sys

from gbx_client.cli import main

sys.exit(main())
