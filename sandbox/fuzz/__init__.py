"""``sandbox fuzz``: a fuzzer for the intercept logic and the handlers behind it.

* :mod:`.case` -- a test case (guest bytes + VMCB configuration) and its file format;
* :mod:`.table` / :mod:`.generate` -- case generators;
* :mod:`.snapshot` -- the prepared machine, restored per case (CPU context + dirtied pages);
* :mod:`.audit` -- the slow soundness audit (capstone, APM rules computed independently);
* :mod:`.oracle` -- findings, fast oracles, coverage keys;
* :mod:`.campaign` -- the campaign loop, workers, corpus, crashes, live status.
"""
