"""`prmkern report`: an HTML page a person would rather look at than read, from verify's JSONL rows.

data.py reads runs and computes the numbers (F1, calibration bins, the sweep's axis); figures.py draws them with
matplotlib (the `plot` extra, Agg backend); page.py assembles one self-contained HTML page with the figures as
embedded PNGs. The engine and the other commands never import this package (the command line imports it only when
`prmkern report` runs). Not to be confused with prmkern/cli/report.py (what a job prints on stderr).
"""
