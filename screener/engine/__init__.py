"""The engine contract the trainer builds against and the node loads.

``manifest`` (the contract on disk), ``preprocessing`` (the one pixel path of trainer and node),
``runtime`` (backends behind one ``predict``), ``roi`` (boxes from the ROI engine), and ``metrics`` /
``report`` (the honest evaluation both the trainer and ``screener replay --labels`` print).
"""
