"""`python -m node`: the same command line as `dicom-node`."""

import sys

from node.cli import main

sys.exit(main())
