"""python -m autoround_exp.tracking sync [--results DIR] [--uri URI] [--experiment NAME]"""

import sys

from autoround_exp.tracking.sync import main

sys.exit(main())
