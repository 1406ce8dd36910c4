import Agent
import Foundation
import Libvirt
import Support
import Testing
import TestSupport

/// The agent as its users see it: a real pool on loopback, the real
/// `corral` binary, the busybox guest on qemu:///system.
@Suite("corral agent on qemu:///system")
struct AgentLifecycleTests {
    @Test("a start becomes a running domain and a state-4 report; power actions and delete reach libvirt and the pool")
    func lifecycle() async throws {
        try await withHarness("lifecycle") { harness, _ in
            // Metrics on a port of the system's choosing, which the log names.
            var configuration = try AgentConfiguration.load(path: harness.agentConfig.path)
            configuration.metricsListen = ("127.0.0.1", 0)
            try configuration.rendered().write(to: harness.agentConfig, atomically: true, encoding: .utf8)
            try await harness.startAgent()
            let listening = try await #require(harness.agent).line(inStderrContaining: "metrics listening on ", timeout: .seconds(30))
            let metricsURL = try #require(listening.components(separatedBy: "metrics listening on ").last)
            let name = try await harness.reserve()
            let running = try await harness.waitForPoolState(name, 4) { ($0["console_tail"] as? [String])?.isEmpty == false }
            #expect(running["last_error"] == nil)
            #expect((running["console_tail"] as? [String])?.isEmpty == false)

            let domain = try #require(try await harness.domains(named: name).first)
            #expect(try await domain.state().isActive)
            let metadata = try #require(try await domain.instanceMetadata())
            #expect(metadata.instance == name)
            #expect(metadata.appliance == "rack")
            #expect(metadata.pool == harness.poolURL)
            let description = try await domain.describe()
            #expect(description.vcpus == 1)
            #expect(description.memoryKiB == 128 * 1024)
            #expect(description.virtType == "qemu")
            try await waitForText(TestGuest.readyMarker, inFile: harness.consolePath(name), timeout: TestGuest.bootTimeout)

            var status = try #require(try await harness.agentStatus(name))
            for _ in 0..<40 where status["reported_at"] == nil {
                try await Task.sleep(for: .milliseconds(250))
                status = try #require(try await harness.agentStatus(name))
            }
            #expect(status["phase"] as? String == "active")
            #expect(status["libvirt_state"] as? String == "running (booted)")
            #expect(status["reported_at"] != nil)
            let domainsList = try await runCorral(["domains", "list"])
            #expect(domainsList.stdout.contains(name))

            // The agent's metrics, as Prometheus' own parser reads them.
            let scraped = try await runProgram("/usr/bin/python3", ["-c", "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode(), end='')", metricsURL])
            #expect(scraped.status == 0, "\(scraped.stderr)")
            let samples = try await parsePrometheusText(scraped.stdout)
            #expect(samples.value("corral_agent_builds_in_flight") == 0)
            for step in ["image", "disk", "seed", "define", "start"] {
                #expect(samples.value("corral_agent_build_step_duration_seconds_count", ["step": step]) == 1, "\(step): \(scraped.stdout)")
            }
            #expect(samples.value("corral_agent_image_cache_misses_total") == 3, "the disk, the kernel and the initrd were fetched")
            #expect(samples.value("corral_agent_image_cache_hits_total") == 0)
            #expect(samples.value("corral_agent_domains", ["state": "running"]) == 1)
            #expect(samples.value("corral_agent_domains", ["state": "shut off"]) == 0)
            #expect((samples.value("corral_agent_check_in_duration_seconds_count", ["result": "ok"]) ?? 0) >= 1)
            let outboxAge = try #require(samples.value("corral_agent_outbox_oldest_age_seconds"))
            #expect(outboxAge >= 0 && outboxAge < 120)

            // Private files: the state is root's; what QEMU reads is its group's; nothing is anyone else's.
            let state = harness.stateDirectory
            let images = harness.directory.appendingPathComponent("images").path
            let cached = try FileManager.default.contentsOfDirectory(atPath: images + "/sha256").map { "\(images)/sha256/\($0)" }
            #expect(cached.count == 3, "the disk, kernel and initrd: \(cached)")
            let cachedBytes = try cached.reduce(0) { $0 + ((try FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0) }
            #expect(samples.value("corral_agent_image_cache_bytes") == Double(cachedBytes))
            var expected: [(String, mode_t)] = [
                (state, 0o710), ("\(state)/disks", 0o710), ("\(state)/consoles", 0o710), ("\(state)/agent.sqlite", 0o600),
                ("\(state)/disks/\(name).seed.iso", 0o640), (images, 0o710), (images + "/sha256", 0o710), (images + "/tmp", 0o710),
                (harness.database, 0o600),
            ]
            expected += cached.map { ($0, 0o640) }
            for (path, mode) in expected {
                let actual = try #require(FileModes.mode(of: path), "\(path) exists")
                #expect(String(actual, radix: 8) == String(mode, radix: 8), "mode of \(path)")
            }
            // The overlay QEMU writes (libvirt lends it to QEMU's user while the VM runs)
            // and the console virtlogd writes are no one else's.
            for path in ["\(state)/disks/\(name).qcow2", harness.consolePath(name)] {
                let actual = try #require(FileModes.mode(of: path), "\(path) exists")
                #expect(actual & 0o007 == 0, "\(path) is closed to others: \(String(actual, radix: 8))")
            }

            // SIGTERM stops the agent, not the VM; the next run adopts it as it is.
            #expect(await harness.stopAgent() == 0)
            #expect(try await domain.state().isActive)
            // The second run logs JSON, one object per line (--log-format json).
            try await harness.startAgent(logFormat: "json")
            #expect(try await harness.agentStatus(name)?["phase"] as? String == "active")
            #expect(try await harness.domains(named: name).map(\.uuid) == [domain.uuid])

            try await harness.poolCommand(["instance", "action", "power-off", name])
            let off = try await harness.waitForPoolState(name, 5) { $0["state_reason"] as? String == "shut off (shutdown)" }
            #expect(off["state_reason"] as? String == "shut off (shutdown)")
            #expect(try await domain.state().isActive == false)

            try await harness.poolCommand(["instance", "action", "power-on", name])
            try await harness.waitForPoolState(name, 4)
            #expect(try await domain.state().isActive)
            // A new QEMU process starts the console file afresh.
            try await waitForText(TestGuest.readyMarker, inFile: harness.consolePath(name), timeout: TestGuest.bootTimeout)

            try await harness.poolCommand(["instance", "action", "reboot", name])
            try await waitForText(TestGuest.readyMarker, inFile: harness.consolePath(name), occurrences: 2, timeout: TestGuest.bootTimeout)
            try await harness.waitForPoolState(name, 4)

            try await harness.poolCommand(["instance", "action", "delete", name])
            try await harness.waitForPoolState(name, 7)
            #expect(try await harness.domains(named: name).isEmpty)
            #expect(harness.instanceFiles().isEmpty)
            #expect(try await harness.agentStatus(name) == nil)
            // The token is a secret: not even the debug log shows it.
            let log = try #require(harness.agent?.stderr)
            #expect(!log.contains(harness.applianceToken))
            // Every line is a JSON object with the fixed keys; every line about
            // the instance or one of its actions names it in `instance`.
            let lines = log.split(separator: "\n")
            var aboutIt: [[String: Any]] = []
            for line in lines {
                let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "\(line)")
                #expect(object["time"] is String && object["level"] is String && object["message"] is String, "\(line)")
                #expect(object["label"] as? String == "corral.agent", "\(line)")
                let message = object["message"] as? String ?? ""
                if message.contains(name), !message.hasPrefix("libvirt:") {
                    #expect(object["instance"] as? String == name, "\(line)")
                    aboutIt.append(object)
                }
            }
            let actions = aboutIt.filter { ($0["message"] as? String)?.hasPrefix("action ") == true }
            #expect(actions.count >= 4, "power-off, power-on, reboot, delete: \(actions)")
            #expect(actions.allSatisfy { $0["action"] is String })
        }
    }

    @Test("at the lease's end the VM is suspended, and after the grace period decommissioned")
    func leaseExpiry() async throws {
        try await withHarness("lease", leaseGrace: 4) { harness, _ in
            try await harness.startAgent()
            let name = try await harness.reserve(leaseSeconds: 3600)
            try await harness.waitForPoolState(name, 4)
            let domain = try #require(try await harness.domains(named: name).first)
            try await harness.poolCommand(["instance", "lease", name, "--seconds", "2"])
            let suspended = try await harness.waitForPoolState(name, 5, timeout: .seconds(30)) { $0["state_reason"] is String }
            #expect(suspended["state_reason"] as? String == "paused (user)")
            if case .paused = try await domain.state() {} else {
                Issue.record("expected a paused domain, got \(try await domain.state())")
            }
            try await harness.waitForPoolState(name, 7, timeout: .seconds(30))
            #expect(try await harness.domains(named: name).isEmpty)
            #expect(harness.instanceFiles().isEmpty)
        }
    }

    @Test("a slow callback delays only its own instance: with one build slot, another instance is built and boots meanwhile")
    func slowCallback() async throws {
        let settings = """
            [callbacks]
            timeout_seconds = 45
            allow = ["127.0.0.0/8"]
            ports = []
            """
        try await withHarness("slow-callback", poolSettings: settings, maxConcurrentBuilds: 1) { harness, base in
            try await harness.poolCommand([
                "wisp", "add", "slow", "--owner", "alice", "--image", "busybox", "--callback-url", "\(base)/slow-callback/x",
            ])
            try await harness.startAgent()
            let slow = try await harness.reserve(wisp: "slow")
            // The slow instance is picked up first and its start parameters are awaited.
            let deadline = ContinuousClock.now + .seconds(30)
            while try await harness.agentStatus(slow) == nil, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(200))
            }
            let quick = try await harness.reserve()
            // The quick one is built and its domain started (it took the only
            // build slot) while the slow one still waits: in order, whatever
            // the machine's speed, as long as it is within the 45 s the pool
            // gives the callback.
            var phase = ""
            let started = ContinuousClock.now + .seconds(40)
            while !["booting", "active"].contains(phase), ContinuousClock.now < started {
                phase = try await harness.agentStatus(quick)?["phase"] as? String ?? ""
                if !["booting", "active"].contains(phase) { try await Task.sleep(for: .milliseconds(200)) }
            }
            let waiting = try #require(try await harness.poolInstance(slow))
            #expect(["booting", "active"].contains(phase), "the quick instance's domain started: \(phase)")
            #expect(waiting["state"] as? Int == 3, "the slow instance is still waiting for its callback: \(waiting)")
            #expect(waiting["last_error"] == nil || waiting["last_error"] is NSNull)
            try await harness.waitForPoolState(quick, 4, timeout: .seconds(120))
            let record = try await harness.waitForPoolState(slow, 5, timeout: .seconds(120)) { $0["last_error"] is String }
            #expect((record["last_error"] as? String ?? "").contains("no start parameters within 45 s"), "\(record)")
            #expect(try await harness.domains(named: slow).isEmpty)
        }
    }

    @Test("a wrong image checksum, an unreachable image URL and a refused callback each end errored with nothing left behind")
    func buildFailures() async throws {
        try await withHarness("failures") { harness, base in
            try await harness.poolCommand([
                "image", "add", "wrong-sum", "--url", "\(base)/disk.qcow2", "--sha256", String(repeating: "0", count: 64),
            ])
            try await harness.poolCommand([
                "image", "add", "nowhere", "--url", "http://127.0.0.1:1/disk.qcow2", "--sha256", String(repeating: "1", count: 64),
            ])
            try await harness.poolCommand(["wisp", "add", "wrong-sum", "--owner", "alice", "--image", "wrong-sum"])
            try await harness.poolCommand(["wisp", "add", "nowhere", "--owner", "alice", "--image", "nowhere"])
            try await harness.poolCommand([
                "wisp", "add", "refused", "--owner", "alice", "--image", "busybox", "--callback-url", "http://127.0.0.1:9/start",
            ])
            try await harness.startAgent()
            let expectations = [
                ("wrong-sum", "not the expected \(String(repeating: "0", count: 64))"),
                ("nowhere", "cannot download http://127.0.0.1:1/disk.qcow2"),
                ("refused", "127.0.0.1 is a loopback address"),
            ]
            var names: [String] = []
            for (wisp, _) in expectations { names.append(try await harness.reserve(wisp: wisp)) }
            for (name, (wisp, reason)) in zip(names, expectations) {
                let record = try await harness.waitForPoolState(name, 5, timeout: .seconds(60)) { $0["last_error"] is String }
                let error = record["last_error"] as? String ?? ""
                #expect(error.contains(reason), "\(wisp): \(error)")
                let status = try #require(try await harness.agentStatus(name))
                #expect(status["phase"] as? String == "errored")
                #expect(try await harness.domains(named: name).isEmpty, "\(wisp)")
            }
            #expect(harness.instanceFiles().isEmpty)
            let partial = try FileManager.default.contentsOfDirectory(atPath: harness.directory.appendingPathComponent("images/tmp").path)
            #expect(partial.isEmpty)

            // Deleting an errored instance leaves it decommissioned.
            try await harness.poolCommand(["instance", "action", "delete", names[0]])
            try await harness.waitForPoolState(names[0], 7)
        }
    }
}
