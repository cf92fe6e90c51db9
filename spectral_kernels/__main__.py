"""``python -m spectral_kernels`` runs the ``spectral-kernels`` command line."""
import sys

from .cli import main

sys.exit(main())
