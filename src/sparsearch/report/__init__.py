"""sparsearch.report"""
