// psd-collage for older Photoshop (no UXP): File > Scripts > Browse... and pick this file.
// It saves a copy of the active document into the hot folder's inbox (ROOT/inbox), waits
// for `psd-collage watch ROOT` (or `serve`) to harmonize it, and opens the result from
// ROOT/done. The first run asks for ROOT and remembers it; hold Shift to choose again.
// ExtendScript (ES3): no let/const, no arrow functions, no JSON.

var PSD_COLLAGE = {
    settingsFile: function () {
        return new File(Folder.userData + "/psd-collage-hotfolder.txt");
    },

    readText: function (file) {
        if (!file.exists) return "";
        file.encoding = "UTF-8";
        file.open("r");
        var text = file.read();
        file.close();
        return text;
    },

    writeText: function (file, text) {
        file.encoding = "UTF-8";
        file.open("w");
        file.write(text);
        file.close();
    },

    // ROOT: remembered, or chosen now (Shift held, or not set, or gone).
    root: function (choose) {
        var saved = PSD_COLLAGE.readText(PSD_COLLAGE.settingsFile()).replace(/\s+$/, "");
        var folder = saved ? new Folder(saved) : null;
        if (choose || !folder || !new Folder(folder.fsName + "/inbox").exists) {
            folder = Folder.selectDialog("Choose the psd-collage hot folder (the one holding inbox, done, failed)");
            if (!folder) return null;
            if (!new Folder(folder.fsName + "/inbox").exists) {
                alert("psd-collage: " + folder.fsName + " has no inbox folder.\n" +
                      "Choose the folder that `psd-collage watch` was started on.");
                return null;
            }
            PSD_COLLAGE.writeText(PSD_COLLAGE.settingsFile(), folder.fsName);
        }
        return folder;
    },

    pad: function (n) {
        return (n < 10 ? "0" : "") + n;
    },

    // poster.psd -> poster-20261126-101500.psd: a name no other job has.
    jobName: function (documentName, now) {
        var stem = String(documentName).replace(/\.[^.]*$/, "").replace(/[\\\/:*?"<>|]/g, "_");
        var p = PSD_COLLAGE.pad;
        return stem + "-" + now.getFullYear() + p(now.getMonth() + 1) + p(now.getDate()) + "-" +
            p(now.getHours()) + p(now.getMinutes()) + p(now.getSeconds()) + ".psd";
    },

    // Save a copy under a hidden name (the watcher skips those), then rename it into place.
    send: function (doc, root, name) {
        var hidden = new File(root.fsName + "/inbox/." + name);
        var options = new PhotoshopSaveOptions();
        options.layers = true;
        options.embedColorProfile = true;
        doc.saveAs(hidden, options, true, Extension.LOWERCASE);
        if (!hidden.rename(name)) {
            throw new Error("could not move the copy into " + root.fsName + "/inbox");
        }
    },

    // Wait for done/NAME or failed/NAME.error.txt; returns ["done", file] or ["failed", reason].
    wait: function (root, name, timeoutSeconds) {
        var done = new File(root.fsName + "/done/" + name);
        var stem = name.replace(/\.psd$/, "");
        var error = new File(root.fsName + "/failed/" + stem + ".error.txt");
        var progress = null;
        try {
            progress = new Window("palette", "psd-collage");
            progress.add("statictext", undefined, "Harmonizing " + name + " ...");
            progress.show();
        } catch (e) {
            progress = null; // no UI (a test, or a server-side Photoshop)
        }
        try {
            for (var waited = 0; waited < timeoutSeconds; waited++) {
                if (done.exists) {
                    $.sleep(500); // the watcher moves the file in one step; settle anyway
                    return ["done", done];
                }
                if (error.exists) {
                    return ["failed", PSD_COLLAGE.readText(error).split("\n")[0]];
                }
                if (progress) progress.update();
                $.sleep(1000);
            }
        } finally {
            if (progress) progress.close();
        }
        return ["timeout", "no result after " + timeoutSeconds + " s: is `psd-collage watch` " +
                "running on " + root.fsName + "? The copy is still in its inbox."];
    },

    run: function (timeoutSeconds) {
        if (app.documents.length === 0) {
            alert("psd-collage: open a document first.");
            return null;
        }
        var chooseAgain = false;
        try {
            chooseAgain = ScriptUI.environment.keyboardState.shiftKey;
        } catch (e) {
            chooseAgain = false;
        }
        var root = PSD_COLLAGE.root(chooseAgain);
        if (!root) return null;
        var name = PSD_COLLAGE.jobName(app.activeDocument.name, new Date());
        PSD_COLLAGE.send(app.activeDocument, root, name);
        var outcome = PSD_COLLAGE.wait(root, name, timeoutSeconds || 3600);
        if (outcome[0] === "done") {
            app.open(outcome[1]);
        } else {
            alert("psd-collage: " + outcome[1]);
        }
        return outcome;
    }
};

if (typeof PSD_COLLAGE_NO_RUN === "undefined") {
    PSD_COLLAGE.run();
}
