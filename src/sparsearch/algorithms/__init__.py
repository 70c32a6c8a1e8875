"""sparsearch.algorithms"""
