"""The whole pipeline in one command: `speedrun` (text -> evaluated, exported model + report) and `ablate`
(a grid of speedruns sharing their common stages, one comparison table).

    from nanoforge.pipeline.speedrun import speedrun
    summary = speedrun("cpu-demo", data="../shared/corpus/de")
"""
