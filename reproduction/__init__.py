"""`xclip reproduce`: each paper's headline effect on the built-in world, one module a part.

    cli.py      the command line: settings, input checks, the run loop (`xclip reproduce`, `python -m xclip.reproduction`)
    parts.py    part name -> module (spelling, coop, spatial, textspan, zerocap)
    common.py   the CLIP, mean +- std over seeds, report cells
    report.py   reproduction.md + reproduction.png from the part JSONs
"""
