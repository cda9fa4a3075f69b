"""`coe eval`: offline MT-Bench and Arena-Hard runs of the composed system, its experts and its
baselines, judged by an LLM.

data.py (benchmark files), systems.py (what answers), judge.py (who grades, with a cache),
mt_bench.py and arena_hard.py (each protocol's prompts, parsing and scores), run.py (resumable
run folders), report.py (markdown, JSON and plots)."""
