"""The end-of-run table (table.py), the Markdown report (markdown.py) and its plots (plots.py).

    python -m alignment.report outputs/sft_then_dpo [outputs/other_run ...] [--out DIR]
"""
