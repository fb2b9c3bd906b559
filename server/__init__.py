"""lstmserve.server"""
