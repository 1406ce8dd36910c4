import Foundation
import Libvirt
import Testing
import TestSupport

/// What the agent does after the unexpected: killed mid-build, the pool gone.
@Suite("corral agent recovery on qemu:///system")
struct AgentRecoveryTests {
    @Test("kill -9 during a build, then restart: exactly one domain and no orphan files")
    func killDuringBuild() async throws {
        try await withHarness("kill") { harness, _ in
            // The base image trickles out over ~10 s, so the kill lands mid-download.
            try await harness.addImage("slow", path: "slow/disk.qcow2")
            try await harness.poolCommand(["wisp", "add", "slow", "--owner", "alice", "--image", "slow"])
            try await harness.startAgent()
            let name = try await harness.reserve(wisp: "slow")
            try await harness.waitForPoolState(name, 3)
            try await Task.sleep(for: .seconds(2))
            #expect(await harness.stopAgent(signal: SIGKILL) == 128 + SIGKILL)
            #expect(try await harness.domains(named: name).isEmpty)

            try await harness.startAgent()
            // Then kill it again the moment its domain exists.
            let deadline = ContinuousClock.now + .seconds(120)
            while try await harness.domains(named: name).isEmpty, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(await harness.stopAgent(signal: SIGKILL) == 128 + SIGKILL)

            try await harness.startAgent()
            try await harness.waitForPoolState(name, 4)
            try await waitForText(TestGuest.readyMarker, inFile: harness.consolePath(name), timeout: TestGuest.bootTimeout)
            #expect(try await harness.domains(named: name).count == 1)
            #expect(harness.instanceFiles() == ["consoles/\(name).log", "disks/\(name).qcow2", "disks/\(name).seed.iso"])
            let partial = try FileManager.default.contentsOfDirectory(atPath: harness.directory.appendingPathComponent("images/tmp").path)
            #expect(partial.isEmpty)
            let cached = try FileManager.default.contentsOfDirectory(atPath: harness.directory.appendingPathComponent("images/sha256").path)
            #expect(cached.count == 3)  // disk, kernel, initrd: each once
        }
    }

    @Test("with the pool stopped, reports wait, and arrive in order when it returns")
    func poolDown() async throws {
        try await withHarness("pool-down") { harness, _ in
            try await harness.startAgent()
            let name = try await harness.reserve()
            try await harness.waitForPoolState(name, 4)
            let domain = try #require(try await harness.domains(named: name).first)
            try await waitForText(TestGuest.readyMarker, inFile: harness.consolePath(name), timeout: TestGuest.bootTimeout)

            await harness.stopPool()
            // Stopped, then started again, behind the agent's back: two reports queue.
            #expect(try await domain.shutdown(timeout: .seconds(60)) == .graceful)
            try await waitForStatus(harness, name, "suspended")
            try await domain.start()
            try await waitForStatus(harness, name, "running")
            let status = try await runCorral(["agent", "status", "--config", harness.agentConfig.path])
            #expect(status.stdout.contains("2 report(s) waiting for the pool"), "\(status.stdout)")
            // The pool stays down until the agent has tried and failed to deliver.
            _ = try await harness.agent!.line(inStderrContaining: "not delivered", timeout: .seconds(60))

            try await harness.startPool()
            // In order, the last report (running) wins; out of order it would be 5.
            try await harness.waitForPoolState(name, 4, timeout: .seconds(90))
            let deadline = ContinuousClock.now + .seconds(60)
            while ContinuousClock.now < deadline {
                if try await !runCorral(["agent", "status", "--config", harness.agentConfig.path]).stdout.contains("waiting") { break }
                try await Task.sleep(for: .milliseconds(250))
            }
            try await Task.sleep(for: .seconds(2))
            #expect(try await harness.poolInstance(name)?["state"] as? Int == 4)
        }
    }

    @Test("a libvirtd restart is survived: the agent reconnects and its events and actions work again")
    func libvirtdRestart() async throws {
        try await withHarness("libvirtd", restartsLibvirtd: true) { harness, _ in
            try await harness.startAgent()
            let name = try await harness.reserve()
            try await harness.waitForPoolState(name, 4)
            try await waitForText(TestGuest.readyMarker, inFile: harness.consolePath(name), timeout: TestGuest.bootTimeout)

            let killed = try await runProgram("pkill", ["-TERM", "-x", "libvirtd"])
            try #require(killed.status == 0, "pkill libvirtd: \(killed.stderr)")
            _ = try await harness.agent!.line(inStderrContaining: "libvirt connection lost", timeout: .seconds(30))
            let restarted = try await runCommand(Paths.packageRoot.appendingPathComponent("scripts/setup"), [])
            try #require(restarted.status == 0, "scripts/setup: \(restarted.stderr)")
            _ = try await harness.agent!.line(inStderrContaining: "libvirt connection restored", timeout: .seconds(60))

            // The guest kept running; a power-off through the pool reaches
            // it and its stop event comes back as a report.
            try await harness.poolCommand(["instance", "action", "power-off", name])
            let off = try await harness.waitForPoolState(name, 5, timeout: .seconds(90)) { $0["state_reason"] as? String == "shut off (shutdown)" }
            #expect(off["state_reason"] as? String == "shut off (shutdown)")
        }
    }

    /// Waits until `corral agent status` shows the pool state `word` for the instance.
    func waitForStatus(_ harness: Harness, _ name: String, _ word: String) async throws {
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if let row = try await harness.agentStatus(name), (row["pool_state"] as? String)?.hasSuffix(word) == true { return }
            try await Task.sleep(for: .milliseconds(250))
        }
        throw SetupError("\(name) never showed '\(word)' in corral agent status\n\(harness.logs)")
    }
}
