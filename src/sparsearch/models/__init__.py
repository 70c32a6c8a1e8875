"""sparsearch.models"""
