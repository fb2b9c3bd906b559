"""lstmserve.export"""
