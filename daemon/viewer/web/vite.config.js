// Builds the viewer pages into ../static (committed: the daemon serves them without npm at runtime).
import { resolve } from "node:path";
import { defineConfig } from "vite";

export default defineConfig({
  root: __dirname,
  base: "/viewer/",
  build: {
    outDir: resolve(__dirname, "../static"),
    emptyOutDir: true,
    chunkSizeWarningLimit: 800,
    rollupOptions: {
      input: {
        viewer: resolve(__dirname, "viewer.html"),
        publish: resolve(__dirname, "publish.html"),
      },
    },
  },
});
