"""sparsearch.oneshot"""
