"""`python -m evaluation`: see `evaluation.imagenet`."""

import sys

from .imagenet import main

sys.exit(main())
