"""``python -m alignment.report RUN_DIR [RUN_DIR ...] [--out DIR]``: see alignment/report/markdown.py."""

from alignment.report.markdown import main

raise SystemExit(main())
