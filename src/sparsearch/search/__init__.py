"""sparsearch.search"""
