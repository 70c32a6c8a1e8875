"""sparsearch.data"""
