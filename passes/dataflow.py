"""A networkx view of an FX graph's dataflow, for analyses that ask reachability and distance questions.

    fx:  a = f(x); b = g(a, w)        nx.DiGraph:  x -> a -> b <- w     (edge = "value flows into")
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        for parent in node.all_input_nodes:
            dag.add_edge(parent, node)
    return dag


def producers_by_distance(dag: nx.DiGraph, node: fx.Node, max_depth: int):
    """Yields the nodes ``node`` depends on, nearest first (breadth-first over reversed edges)."""
    for depth, layer in enumerate(nx.bfs_layers(dag.reverse(copy=False), [node])):
        if depth > max_depth:
            return
        yield from layer
