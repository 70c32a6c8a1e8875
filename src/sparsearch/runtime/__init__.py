"""sparsearch.runtime"""
