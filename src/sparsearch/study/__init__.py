"""sparsearch.study"""
