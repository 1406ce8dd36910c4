import Foundation
import Synchronization
import Testing
import TestSupport

@testable import Libvirt

/// The wrapper on the machine's libvirtd with real QEMU and a real guest.
@Suite("Libvirt wrapper on qemu:///system with a real guest")
struct SystemQEMUTests {
    static func uniqueName(_ label: String) -> String {
        "corral-test-\(label)-\(UUID().uuidString.prefix(8).lowercased())"
    }

    /// Removes a test domain whatever state it is in.
    static func remove(_ domain: Domain) async {
        try? await domain.destroy()
        try? await domain.undefine()
    }

    @Test("a real guest boots, stops gracefully and when destroyed, with events and reasons")
    func lifecycle() async throws {
        try await SystemLibvirt.shared {
            let guest = try await TestGuest.shared()
            let scratch = try Paths.scratchDirectory("lifecycle")
            defer { try? FileManager.default.removeItem(at: scratch) }
            let console = scratch.appendingPathComponent("console.log").path
            let connection = try await Connection.open(SystemLibvirt.uri)
            let events = try await connection.events()

            let name = Self.uniqueName("life")
            let domain = try await connection.defineDomain(
                xml: guest.domainXML(name: name, consoleLog: console, memoryMiB: 128, vcpus: 2))
            do {
                #expect(try await domain.state() == .shutoff(.unknown))
                try await domain.start()
                try await waitForText(TestGuest.readyMarker, inFile: console, timeout: TestGuest.bootTimeout)
                #expect(try await domain.state() == .running(.booted))
                let info = try await domain.info()
                #expect(info.vcpus == 2)
                #expect(info.maxMemoryKiB == 128 * 1024)
                #expect(info.cpuTimeNanoseconds > 0)

                let metadata = InstanceMetadata(instance: "web-1", appliance: "rack-1", pool: "http://127.0.0.1:8080")
                try await domain.setInstanceMetadata(metadata)
                #expect(try await domain.instanceMetadata() == metadata)
                #expect(try await domain.describe(inactive: true).instance == metadata)
                #expect(try await domain.describe().consoleLogPath == console)

                try await domain.suspend()
                #expect(try await domain.state() == .paused(.user))
                try await domain.resume()
                #expect(try await domain.state() == .running(.unpaused))

                // A reboot goes through the guest (ACPI) and boots it again.
                try await domain.reboot()
                try await waitForText(TestGuest.readyMarker, inFile: console, occurrences: 2, timeout: TestGuest.bootTimeout)
                #expect(try await domain.state().isActive)

                // The guest powers off on the ACPI power button.
                #expect(try await domain.shutdown(timeout: .seconds(60)) == .graceful)
                #expect(try await domain.state() == .shutoff(.shutdown))
                #expect(try await domain.shutdown(timeout: .seconds(1)) == .notRunning)

                try FileManager.default.removeItem(atPath: console)
                try await domain.start()
                try await waitForText(TestGuest.readyMarker, inFile: console, timeout: TestGuest.bootTimeout)
                try await domain.destroy()
                #expect(try await domain.state() == .shutoff(.destroyed))

                try await domain.undefine()
                let error = await #expect(throws: LibvirtError.self) { try await connection.domain(named: name) }
                #expect(error?.code == .noDomain)
            } catch {
                await Self.remove(domain)
                throw error
            }

            var kinds: [DomainEvent.Kind] = []
            for await event in events {
                guard case .domain(let domainEvent) = event, domainEvent.name == name else { continue }
                kinds.append(domainEvent.kind)
                if domainEvent.kind == .undefined { break }
            }
            let expected: [DomainEvent.Kind] = [
                .defined, .started, .suspended, .resumed, .stopped(.shutdown), .started, .stopped(.destroyed), .undefined,
            ]
            // QEMU adds events of its own (a start also resumes the CPUs):
            // the expected ones must appear in this order among them.
            #expect(isSubsequence(expected, of: kinds), "events seen: \(kinds)")
            await connection.close()
        }
    }

    @Test("a guest that cannot answer a graceful shutdown is destroyed")
    func shutdownTimeout() async throws {
        try await SystemLibvirt.shared {
            let guest = try await TestGuest.shared()
            let scratch = try Paths.scratchDirectory("timeout")
            defer { try? FileManager.default.removeItem(at: scratch) }
            let console = scratch.appendingPathComponent("console.log").path
            let connection = try await Connection.open(SystemLibvirt.uri)
            let domain = try await connection.createTransientDomain(
                xml: guest.domainXML(name: Self.uniqueName("stubborn"), consoleLog: console))
            do {
                // Paused CPUs cannot react to the power button.
                try await domain.suspend()
                #expect(try await domain.shutdown(timeout: .seconds(2)) == .destroyed)
                let error = await #expect(throws: LibvirtError.self) { try await domain.state() }
                #expect(error?.code == .noDomain, "a transient domain is gone once destroyed")
            } catch {
                await Self.remove(domain)
                throw error
            }
            await connection.close()
        }
    }

    @Test("an emulator that dies is reported as failed, the domain as crashed")
    func emulatorDies() async throws {
        try await SystemLibvirt.shared {
            let guest = try await TestGuest.shared()
            let scratch = try Paths.scratchDirectory("dies")
            defer { try? FileManager.default.removeItem(at: scratch) }
            let console = scratch.appendingPathComponent("console.log").path
            let connection = try await Connection.open(SystemLibvirt.uri)
            let events = EventRecorder(try await connection.events())
            let name = Self.uniqueName("dies")
            let domain = try await connection.defineDomain(xml: guest.domainXML(name: name, consoleLog: console))
            do {
                try await domain.start()
                try await waitForText(TestGuest.readyMarker, inFile: console, timeout: TestGuest.bootTimeout)
                let pidText = try String(contentsOfFile: "/run/libvirt/qemu/\(name).pid", encoding: .utf8)
                let pid = try #require(pid_t(pidText.trimmingCharacters(in: .whitespacesAndNewlines)))
                #expect(kill(pid, SIGKILL) == 0)
                try await events.expect(within: .seconds(30)) {
                    if case .domain(let event) = $0 { event.name == name && event.kind == .stopped(.failed) } else { false }
                }
                #expect(try await domain.state() == .shutoff(.crashed))
                #expect(try await domain.state().description == "shut off (crashed)")
            } catch {
                await Self.remove(domain)
                throw error
            }
            await Self.remove(domain)
            await connection.close()
        }
    }

    @Test("auto virtualisation falls back or proves KVM within its bound, and the result boots")
    func virtualisationProbe() async throws {
        try await SystemLibvirt.shared {
            let guest = try await TestGuest.shared()
            let scratch = try Paths.scratchDirectory("probe")
            defer { try? FileManager.default.removeItem(at: scratch) }
            let connection = try await Connection.open(SystemLibvirt.uri)

            let started = ContinuousClock.now
            let resolved = await connection.resolveVirtualization(.auto, workDirectory: scratch, timeout: .seconds(8))
            let elapsed = ContinuousClock.now - started
            #expect(resolved.type == .kvm || resolved.type == .qemu)
            // Two probes of at most 8 s each, creation included, plus the
            // destruction of two guests, which a machine busy with the other
            // suites' guests has stretched to 48 s: the bound is only that
            // the probe ends, where a hung KVM guest would never return.
            #expect(elapsed < .seconds(120), "auto took \(elapsed): the probe must be bounded")
            #expect(try await connection.domains().allSatisfy { !$0.name.hasPrefix("corral-kvm-probe-") })

            let console = scratch.appendingPathComponent("console.log").path
            let domain = try await connection.createTransientDomain(
                xml: guest.domainXML(name: Self.uniqueName("probed"), virtType: resolved.type.rawValue, consoleLog: console))
            do {
                try await waitForText(TestGuest.readyMarker, inFile: console, timeout: TestGuest.bootTimeout)
            } catch {
                await Self.remove(domain)
                throw SetupError("the resolved type \(resolved.type) (\(resolved.reason)) did not boot: \(error)")
            }
            await Self.remove(domain)

            let configured = await connection.resolveVirtualization(.qemu, workDirectory: scratch)
            #expect(configured.type == .qemu)
            await connection.close()
        }
    }

    @Test("a directory pool holds qcow2 overlays on a backing image")
    func storage() async throws {
        try await SystemLibvirt.shared {
            let scratch = try Paths.scratchDirectory("pool")
            defer { try? FileManager.default.removeItem(at: scratch) }
            let base = scratch.appendingPathComponent("base.qcow2").path
            let created = try await runCommand(
                URL(fileURLWithPath: "/usr/bin/qemu-img"), ["create", "-q", "-f", "qcow2", base, "64M"])
            try #require(created.status == 0, "qemu-img create: \(created.stderr)")

            let connection = try await Connection.open(SystemLibvirt.uri)
            let poolName = Self.uniqueName("pool")
            let directory = scratch.appendingPathComponent("volumes").path
            let pool = try await connection.directoryPool(named: poolName, path: directory)
            do {
                // Asking again reuses the pool.
                #expect(try await connection.directoryPool(named: poolName, path: directory) == pool)
                #expect(try await connection.storagePoolNames().contains(poolName))

                let capacity: UInt64 = 128 * 1024 * 1024
                let overlay = try await pool.createOverlay(
                    name: "disk.qcow2", backingPath: base, backingFormat: "qcow2", capacityBytes: capacity)
                #expect(overlay.path == directory + "/disk.qcow2")
                #expect(try await overlay.info().capacityBytes == capacity)
                #expect(try await overlay.xml().contains(base))
                #expect(try await pool.volumeNames() == ["disk.qcow2"])
                #expect(try await pool.volume(named: "disk.qcow2") == overlay)

                let inspected = try await runCommand(
                    URL(fileURLWithPath: "/usr/bin/qemu-img"), ["info", "--output=json", overlay.path])
                let json = try #require(
                    JSONSerialization.jsonObject(with: Data(inspected.stdout.utf8)) as? [String: Any])
                #expect(json["format"] as? String == "qcow2")
                #expect(json["backing-filename"] as? String == base)
                #expect((json["virtual-size"] as? NSNumber)?.uint64Value == capacity)

                try await overlay.delete()
                #expect(!FileManager.default.fileExists(atPath: overlay.path))
                let missing = await #expect(throws: LibvirtError.self) { try await pool.volume(named: "disk.qcow2") }
                #expect(missing?.code == .noStorageVolume)
            } catch {
                try? await pool.remove(deleteDirectory: true)
                throw error
            }
            try await pool.remove(deleteDirectory: true)
            #expect(!FileManager.default.fileExists(atPath: directory))
            let gone = await #expect(throws: LibvirtError.self) { try await connection.storagePool(named: poolName) }
            #expect(gone?.code == .noStoragePool)
            await connection.close()
        }
    }

    @Test("a libvirtd restart is survived: reconnect, events again, guest still running")
    func libvirtdRestart() async throws {
        try await SystemLibvirt.exclusive {
            let guest = try await TestGuest.shared()
            let scratch = try Paths.scratchDirectory("restart")
            defer { try? FileManager.default.removeItem(at: scratch) }
            let console = scratch.appendingPathComponent("console.log").path
            let connection = try await Connection.open(SystemLibvirt.uri)
            let domain = try await connection.createTransientDomain(
                xml: guest.domainXML(name: Self.uniqueName("survivor"), consoleLog: console))
            do {
                try await waitForText(TestGuest.readyMarker, inFile: console, timeout: TestGuest.bootTimeout)
                let events = EventRecorder(try await connection.events())

                let killed = try await runCommand(URL(fileURLWithPath: "/usr/bin/pkill"), ["-TERM", "-x", "libvirtd"])
                try #require(killed.status == 0, "pkill libvirtd: \(killed.stderr)")
                try await events.expect(within: .seconds(30)) {
                    if case .disconnected = $0 { true } else { false }
                }
                let restarted = try await runCommand(Paths.packageRoot.appendingPathComponent("scripts/setup"), [])
                try #require(restarted.status == 0, "scripts/setup: \(restarted.stderr)")
                try await events.expect(within: .seconds(60)) { $0 == .reconnected }

                // Calls work again, the guest kept running, and events flow
                // on the new connection.
                #expect(try await domain.state() == .running(.booted))
                let probeName = Self.uniqueName("after")
                let probe = try await connection.defineDomain(
                    xml: guest.domainXML(name: probeName, consoleLog: scratch.appendingPathComponent("after.log").path))
                try await probe.undefine()
                try await events.expect(within: .seconds(30)) {
                    if case .domain(let event) = $0 { event.name == probeName && event.kind == .defined } else { false }
                }
            } catch {
                await Self.remove(domain)
                throw error
            }
            await Self.remove(domain)
            await connection.close()
        }
    }
}

/// Whether `needle` appears in `haystack` in order, gaps allowed.
func isSubsequence<T: Equatable>(_ needle: [T], of haystack: [T]) -> Bool {
    var remaining = needle[...]
    for element in haystack where element == remaining.first { remaining = remaining.dropFirst() }
    return remaining.isEmpty
}

/// Collects a connection's events in the background, for tests to wait on.
final class EventRecorder: Sendable {
    private final class Log: Sendable {
        let events = Mutex<[ConnectionEvent]>([])
    }

    private let log = Log()
    private let task: Task<Void, Never>

    init(_ stream: AsyncStream<ConnectionEvent>) {
        let log = self.log
        task = Task { for await event in stream { log.events.withLock { $0.append(event) } } }
    }

    deinit { task.cancel() }

    /// Waits until an event recorded after the previous match matches.
    func expect(within timeout: Duration, _ matches: (ConnectionEvent) -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let found = log.events.withLock { events -> Bool in
                guard let index = events.firstIndex(where: matches) else { return false }
                events.removeFirst(index + 1)
                return true
            }
            if found { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw SetupError("no matching event within \(timeout); saw \(log.events.withLock { $0 })")
    }
}
