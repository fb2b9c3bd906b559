"""lstmserve.client"""
